"""The two-person rule of a forced override: one identity asks, a different one approves.

Identities are given through the Python API (as a gateway passes an authenticated name); the
command line's identity is the OS user running it, which no option can change.
"""

from __future__ import annotations

import json
import os
import pwd
import threading
from typing import Any

import pytest

from producer.client import Producer
from producer.errors import InvalidOperation
from producer.identity import os_identity
from producer.spec import CommandSpec
from producer.states import State
from tests.conftest import Env
from tests.conftest import run_cli as cli

FORCED = {"ticket": "OPS-9", "operator": "alice", "reason": "stuck, undone by hand"}


def in_state(producer: Producer, *path: State) -> str:
    """A command (never published, no worker needed) moved along `path` from pending."""
    spec = CommandSpec(tenant="alpha", argv=["/bin/true"], compensate=["/bin/echo", "undo"])
    cid = producer.store.create(spec, actor="test").id
    here = State.PENDING
    for version, to in enumerate(path, start=1):
        producer.store.transition(
            cid, expect_state=here, expect_version=version, to=to, actor="test"
        )
        here = to
    return cid


def succeeded(producer: Producer) -> str:
    return in_state(producer, State.RUNNING, State.SUCCEEDED)


def revert_failed(producer: Producer) -> str:
    return in_state(producer, State.RUNNING, State.FAILED, State.REVERTING, State.REVERT_FAILED)


def events(producer: Producer, command_id: str, *phases: str) -> list[Any]:
    return [e for e in producer.audit_events(command_id=command_id) if e.phase in phases]


def test_a_forced_override_waits_until_a_different_identity_approves_it(
    producer: Producer,
) -> None:
    cid = succeeded(producer)
    before = producer.get(cid)

    # alice asks, even naming bob as the operator: nothing changes yet.
    asked = producer.override(
        cid, **{**FORCED, "operator": "bob"}, resolution="failed", force=True, identity="alice"
    )
    assert (asked.state, asked.version) == (State.SUCCEEDED, before.version)
    pending = producer.pending_override(cid)
    assert pending is not None
    assert (pending.requested_by, pending.operator, pending.ticket) == ("alice", "bob", "OPS-9")
    assert pending.resolution is State.FAILED and pending.version == before.version

    # The same identity, however spelled and whatever operator it claimed, cannot approve.
    for same in ("alice", "ALICE"):
        with pytest.raises(InvalidOperation, match="cannot also approve"):
            producer.approve(cid, ticket="OPS-9", identity=same)
    with pytest.raises(InvalidOperation, match="not the override's ticket"):
        producer.approve(cid, ticket="OPS-1", identity="bob")
    with pytest.raises(InvalidOperation, match="needs --ticket"):
        producer.approve(cid, ticket=None, identity="bob")
    assert producer.get(cid).state is State.SUCCEEDED

    done = producer.approve(cid, ticket="OPS-9", reason="checked the host", identity="bob")
    assert done.state is State.FAILED and done.needs_attention is False
    assert done.compensation is not None
    assert {k: done.compensation[k] for k in ("settled_by", "approved_by", "operator")} == {
        "settled_by": "alice",
        "approved_by": "bob",
        "operator": "bob",
    }
    assert done.compensation["forced"] is True and done.compensation["ticket"] == "OPS-9"
    last = producer.get(cid, with_transitions=True).transitions[-1]
    assert (last.from_state, last.to_state, last.actor) == (
        State.SUCCEEDED,
        State.FAILED,
        "bob",
    )
    assert producer.pending_override(cid) is None

    trail = [
        (e.phase, e.outcome, e.actor)
        for e in events(producer, cid, "override", "override_request", "approve")
    ]
    assert trail == [
        ("override_request", "ok", "alice"),
        ("approve", "refused", "alice"),
        ("approve", "refused", "ALICE"),
        ("approve", "refused", "bob"),
        ("approve", "refused", "bob"),
        ("approve", "ok", "bob"),
        ("override", "ok", "bob"),
    ]
    request, *refusals, approved, settled = events(
        producer, cid, "override", "override_request", "approve"
    )
    assert request.detail["identity"] == "alice" and request.detail["claimed_operator"] == "bob"
    assert (request.ticket, request.reason) == ("OPS-9", "stuck, undone by hand")
    assert request.detail["resolution"] == "failed" and request.detail["from_state"] == "succeeded"
    assert all(e.detail["requested_by"] == "alice" for e in refusals)
    assert approved.detail["requested_by"] == "alice" and approved.detail["approved_by"] == "bob"
    assert approved.reason == "checked the host"
    assert approved.detail["request_event"] == request.event_id
    assert settled.detail["requested_by"] == "alice" and settled.detail["approver"] == "bob"
    assert settled.detail["forced"] is True and settled.operator == "bob"

    # The request was used up: approving again is refused, and audited.
    with pytest.raises(InvalidOperation, match="no forced override waiting"):
        producer.approve(cid, ticket="OPS-9", identity="carol")
    assert events(producer, cid, "approve")[-1].outcome == "refused"


def test_the_old_self_approval_settles_nothing(producer: Producer) -> None:
    cid = succeeded(producer)
    with pytest.raises(InvalidOperation, match="execq approve") as refused:
        producer.override(
            cid, **FORCED, resolution="failed", force=True, approver="bob", identity="alice"
        )
    assert "--approver is no longer accepted" in str(refused.value)
    assert producer.get(cid).state is State.SUCCEEDED
    assert producer.pending_override(cid) is None
    (event,) = events(producer, cid, "override", "override_request")
    assert (event.outcome, event.actor, event.operator) == ("refused", "alice", "alice")
    assert "--approver" in (event.reason or "")
    # Nothing was asked for, so there is nothing for bob to approve either.
    with pytest.raises(InvalidOperation, match="no forced override waiting"):
        producer.approve(cid, ticket="OPS-9", identity="bob")
    assert producer.get(cid).state is State.SUCCEEDED


def test_an_approval_after_the_command_changed_is_refused(producer: Producer) -> None:
    cid = in_state(producer, State.RUNNING, State.FAILED)
    producer.override(cid, **FORCED, resolution="reverted", force=True, identity="alice")
    rec = producer.get(cid)
    # Someone retries it meanwhile: the request was about a command that no longer is.
    producer.store.transition(
        cid, expect_state=State.FAILED, expect_version=rec.version, to=State.PENDING, actor="x"
    )
    assert producer.pending_override(cid) is None
    with pytest.raises(InvalidOperation, match="changed since alice asked"):
        producer.approve(cid, ticket="OPS-9", identity="bob")
    assert producer.get(cid).state is State.PENDING
    last = events(producer, cid, "approve")[-1]
    assert (last.outcome, last.actor, last.detail["requested_by"]) == ("refused", "bob", "alice")


def test_of_approvals_racing_only_one_settles_the_command(producer: Producer) -> None:
    cid = succeeded(producer)
    producer.override(cid, **FORCED, resolution="failed", force=True, identity="alice")
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def approve(name: str) -> None:
        barrier.wait()
        try:
            producer.approve(cid, ticket="OPS-9", identity=name)
            outcomes.append("ok")
        except InvalidOperation:
            outcomes.append("refused")

    threads = [threading.Thread(target=approve, args=(n,)) for n in ("b", "c", "d", "e")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok", "refused", "refused", "refused"]
    rec = producer.get(cid, with_transitions=True)
    assert rec.state is State.FAILED
    assert [t.to_state for t in rec.transitions].count(State.FAILED) == 1
    assert len([e for e in events(producer, cid, "override") if e.outcome == "ok"]) == 1


def test_an_ordinary_override_still_settles_at_once_and_records_both_names(
    producer: Producer,
) -> None:
    cid = revert_failed(producer)
    rec = producer.override(cid, **FORCED, resolution="failed", identity="alice.smith")
    assert rec.state is State.FAILED and rec.needs_attention is False
    (event,) = events(producer, cid, "override")
    assert (event.outcome, event.actor, event.operator) == ("ok", "alice.smith", "alice")
    assert event.detail["identity"] == "alice.smith" and event.detail["forced"] is False
    assert rec.compensation is not None and rec.compensation["settled_by"] == "alice.smith"

    # --force on a revert_failed command needs nobody else: it is an ordinary override.
    other = revert_failed(producer)
    assert producer.override(other, **FORCED, force=True, identity="alice").state is (
        State.REVERTED
    )
    assert producer.pending_override(other) is None
    with pytest.raises(ValueError, match="blank"):
        producer.override(other, **FORCED, identity="  ")


def test_the_identity_is_the_os_user_whatever_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = pwd.getpwuid(os.getuid()).pw_name
    for name in ("USER", "LOGNAME", "LNAME", "USERNAME", "OTEL_SERVICE_NAME"):
        monkeypatch.setenv(name, "somebody-else")
    assert os_identity() == real


# --- the command line ------------------------------------------------------------------------


def test_the_cli_refuses_approver_and_explains_the_new_way(env: Env, producer: Producer) -> None:
    cid = succeeded(producer)
    args = ["--ticket", "OPS-9", "--operator", "alice", "--reason", "stuck"]
    done = cli(env, "override", cid, *args, "--force", "--approver", "bob", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    error = json.loads(done.stdout)["error"]
    assert "--approver is no longer accepted" in error and "execq approve" in error
    assert producer.get(cid).state is State.SUCCEEDED
    (event,) = events(producer, cid, "override", "override_request")
    assert event.outcome == "refused" and event.actor == os_identity()


def test_the_cli_asks_for_a_forced_override_and_refuses_its_own_approval(
    env: Env, producer: Producer
) -> None:
    cid = succeeded(producer)
    me = os_identity()
    # --operator names someone else: it is recorded, but the identity is still the OS user.
    args = ["--ticket", "OPS-9", "--operator", "bob", "--reason", "stuck"]
    asked = cli(env, "override", cid, *args, "--force", "--resolution", "failed", "--json")
    assert asked.returncode == 0, asked.stdout + asked.stderr
    body = json.loads(asked.stdout)
    assert body["state"] == "succeeded"
    assert body["pending_override"]["requested_by"] == me
    assert body["pending_override"]["operator"] == "bob"

    own = cli(env, "approve", cid, "--ticket", "OPS-9", "--json", extra={"USER": "bob"})
    assert own.returncode == 1, own.stdout + own.stderr
    assert "cannot also approve" in json.loads(own.stdout)["error"]
    assert producer.get(cid).state is State.SUCCEEDED
    refused = events(producer, cid, "approve")[-1]
    assert (refused.outcome, refused.actor, refused.detail["requested_by"]) == (
        "refused",
        me,
        me,
    )

    # A different identity (here through the API, as a gateway would) carries it out, and
    # the command line shows the result.
    producer.approve(cid, ticket="OPS-9", identity=f"not-{me}")
    shown = cli(env, "status", cid, "--json")
    assert json.loads(shown.stdout)["state"] == "failed"

    nothing = cli(env, "approve", cid, "--ticket", "OPS-9", "--json")
    assert nothing.returncode == 1
    assert "no forced override waiting" in json.loads(nothing.stdout)["error"]
    # Asked for again (failed -> reverted), the plain output says what happens next.
    again = cli(env, "override", cid, *args, "--force")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"execq approve {cid} --ticket OPS-9" in again.stdout.replace("\n", " ")
