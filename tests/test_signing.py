"""Signed messages: Redis content is untrusted, so a worker runs only what a producer of
this deployment signed — never a message made up, altered, moved or replayed late."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import redis

from producer.broker import TASK_NAME
from producer.client import Producer
from producer.settings import ConfigInvalid
from producer.signing import EXPIRES, BadSignature, Signer
from producer.signing_settings import SigningSettings
from producer.spec import CommandSpec
from producer.states import State
from tests.conftest import Env, OtlpSink, run_cli, wait_for
from tests.test_worker import Start, _publish_raw

KEY = "k" * 48
OTHER = "o" * 48


def signer(key: str = KEY, ttl_s: float = 60) -> Signer:
    return Signer(key.encode(), ttl_s=ttl_s)


def test_a_signature_covers_id_task_body_and_expiry() -> None:
    s = signer()
    cid = str(uuid.uuid4())
    kwargs = {"command_id": cid, "tenant": "alpha", "secrets": {"T": "v"}}
    headers = {"traceparent": f"00-{'a' * 32}-{'b' * 16}-01"}
    signed = {**headers, **s.sign(cid, TASK_NAME, kwargs)}
    s.verify(cid, TASK_NAME, kwargs, signed)
    for change, expect in (
        (lambda k, h: (str(uuid.uuid4()), TASK_NAME, k, h), "does not match"),
        (lambda k, h: (cid, "other.task", k, h), "does not match"),
        (lambda k, h: (cid, TASK_NAME, {**k, "tenant": "beta"}, h), "does not match"),
        (lambda k, h: (cid, TASK_NAME, {**k, "secrets": {}}, h), "does not match"),
        (lambda k, h: (cid, TASK_NAME, k, {**h, EXPIRES: h[EXPIRES] + 3600}), "does not match"),
        (lambda k, h: (cid, TASK_NAME, k, {"traceparent": h["traceparent"]}), "not signed"),
        (lambda k, h: (cid, TASK_NAME, k, {**h, EXPIRES: "soon"}), "no valid expiry"),
    ):
        with pytest.raises(BadSignature, match=expect):
            s.verify(*change(kwargs, signed))
    with pytest.raises(BadSignature, match="does not match"):
        signer(OTHER).verify(cid, TASK_NAME, kwargs, signed)
    # Trace headers are rewritten by Celery's instrumentation after signing: not covered.
    s.verify(cid, TASK_NAME, kwargs, {**signed, "traceparent": f"00-{'c' * 32}-{'d' * 16}-01"})
    old = {**headers, **signer(ttl_s=-5).sign(cid, TASK_NAME, kwargs)}
    with pytest.raises(BadSignature, match="expired"):
        s.verify(cid, TASK_NAME, kwargs, old)


def test_signing_keys_must_be_long_and_come_from_one_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXECQ_SIGNING_KEY", "short")
    with pytest.raises(ConfigInvalid, match="EXECQ_SIGNING_KEY: the key has 5 bytes"):
        SigningSettings().key()
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    monkeypatch.delenv("EXECQ_SIGNING_KEY")
    monkeypatch.setenv("EXECQ_SIGNING_KEY_FILE", str(path))
    assert SigningSettings().key() == KEY.encode()
    monkeypatch.setenv("EXECQ_SIGNING_KEY", KEY)
    with pytest.raises(ValueError, match="not both"):
        SigningSettings()
    monkeypatch.delenv("EXECQ_SIGNING_KEY")
    monkeypatch.setenv("EXECQ_SIGNING_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigInvalid, match="cannot read"):
        SigningSettings().key()


def test_accepted_keys_verify_but_never_sign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid = str(uuid.uuid4())
    kwargs = {"command_id": cid, "tenant": "alpha", "secrets": {}}
    by_old = signer(OTHER).sign(cid, TASK_NAME, kwargs)
    rotating = Signer(KEY.encode(), ttl_s=60, accepted=(OTHER.encode(),))
    rotating.verify(cid, TASK_NAME, kwargs, by_old)
    by_new = rotating.sign(cid, TASK_NAME, kwargs)
    signer(KEY).verify(cid, TASK_NAME, kwargs, by_new)
    with pytest.raises(BadSignature, match="does not match"):
        signer(OTHER).verify(cid, TASK_NAME, kwargs, by_new)
    # The rotation done: the old key dropped, its messages are refused.
    with pytest.raises(BadSignature, match="does not match"):
        signer(KEY).verify(cid, TASK_NAME, kwargs, by_old)

    monkeypatch.setenv("EXECQ_SIGNING_KEY", KEY)
    monkeypatch.setenv("EXECQ_SIGNING_ACCEPTED_KEYS", f"{OTHER}, {'p' * 40}")
    assert SigningSettings().accepted_keys() == (OTHER.encode(), b"p" * 40)
    monkeypatch.setenv("EXECQ_SIGNING_ACCEPTED_KEYS", f"{OTHER},short")
    with pytest.raises(ConfigInvalid, match=r"ACCEPTED_KEYS \(key 2\): the key has 5 bytes"):
        SigningSettings().accepted_keys()
    monkeypatch.delenv("EXECQ_SIGNING_ACCEPTED_KEYS")
    path = tmp_path / "accepted"
    path.write_text(f"{OTHER}\n\n")
    monkeypatch.setenv("EXECQ_SIGNING_ACCEPTED_KEYS_FILE", str(path))
    assert SigningSettings().accepted_keys() == (OTHER.encode(),)
    monkeypatch.delenv("EXECQ_SIGNING_KEY")
    with pytest.raises(ConfigInvalid, match="accepted keys need a signing key too"):
        SigningSettings().accepted_keys()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_key_rotation_refuses_no_message_in_flight(
    env: Env, workers: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker is mid-rotation: signs with the new key, still accepts the old one.
    env.vars["EXECQ_SIGNING_KEY"] = KEY
    env.vars["EXECQ_SIGNING_ACCEPTED_KEYS"] = OTHER
    workers("alpha")
    outcomes = {}
    for name, key in (("old", OTHER), ("new", KEY), ("unknown", "u" * 48)):
        monkeypatch.setenv("EXECQ_SIGNING_KEY", key)
        with env.producer() as producer:
            r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", name]))
            if name == "unknown":
                wait_for(lambda: _refusals(producer), 20, "the refusal")
                outcomes[name] = producer.get(r.id).state
            else:
                outcomes[name] = producer.wait(r.id, timeout=30).state
    assert outcomes == {"old": State.SUCCEEDED, "new": State.SUCCEEDED, "unknown": State.PENDING}


@pytest.fixture
def signed_env(env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    """The test stack with a signing key for this process (producers) and workers."""
    monkeypatch.setenv("EXECQ_SIGNING_KEY", KEY)
    env.vars["EXECQ_SIGNING_KEY"] = KEY
    return env


def _refusals(producer: Producer, tenant: str = "alpha") -> list[str]:
    return [
        e.reason or ""
        for e in producer.audit_events(tenant=tenant)
        if e.phase == "parse" and e.outcome == "refused"
    ]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_only_signed_messages_run_and_forgeries_are_refused_and_audited(
    signed_env: Env, workers: Start, tmp_path: Path
) -> None:
    url = signed_env.settings.broker_url
    marker = tmp_path / "ran"
    with signed_env.producer() as producer:
        assert producer.publisher.signer is not None
        # A known command whose only messages are tampered ones, pushed straight into Redis:
        # unsigned, and signed with another key. (It has a secret, so nothing but its own
        # producer would publish it.) Then a made-up id, and a genuine message moved to beta.
        spec = CommandSpec(
            tenant="alpha",
            argv=["/bin/sh", "-c", f"echo x >> {marker}"],
            secrets={"TOKEN": "t0ken-value"},
        )
        known = producer.store.create(spec, actor="test")
        r = redis.Redis.from_url(url)
        body = {"command_id": known.id, "tenant": "alpha"}
        _publish_raw(url, "alpha", known.id, body, exchange="")
        forged = signer(OTHER).sign(known.id, TASK_NAME, body)
        _publish_raw(url, "alpha", known.id, body, forged, exchange="")
        made_up = str(uuid.uuid4())
        made_up_body = {"command_id": made_up, "tenant": "alpha"}
        _publish_raw(url, "alpha", made_up, made_up_body, exchange="")
        moved = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"]))
        raw = r.lpop("execq.alpha")  # the newest: the genuine, signed message of `moved`
        assert raw is not None and json.loads(raw)["headers"]["id"] == moved.id
        assert r.llen("execq.alpha") == 3
        r.rpush("execq.beta", raw)
        workers("alpha")
        workers("beta")
        wait_for(lambda: len(_refusals(producer)) >= 3, 30, "three refusals by alpha")
        wait_for(lambda: _refusals(producer, "beta"), 30, "beta's refusal")
        reasons = _refusals(producer)
        assert sum("message is not signed" in x for x in reasons) == 2
        assert any("signature does not match" in x for x in reasons)
        assert _refusals(producer, "beta") == ["message addressed to another tenant"]
        time.sleep(1.0)
        assert not marker.exists()
        assert producer.get(known.id).state is State.PENDING
        assert producer.get(moved.id).state is State.PENDING
        # A genuine, signed submit runs; the chains stay intact.
        ok = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"]))
        assert producer.wait(ok.id, timeout=30).state is State.SUCCEEDED
        assert producer.store.audit.verify().ok


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_an_expired_message_is_refused_and_the_outbox_sends_a_fresh_one(
    signed_env: Env, workers: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXECQ_MESSAGE_TTL_S", "1")
    with signed_env.producer() as producer:
        r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"]))
        producer.flush()
    time.sleep(2.5)
    # Its only message is stale now; the store still holds the command as pending.
    w = workers("alpha", extra_env={"EXECQ_LEASE_S": "1"})
    with signed_env.producer() as producer:
        wait_for(lambda: any("expired" in x for x in _refusals(producer)), 30, "the refusal")
        assert producer.get(r.id).state is State.PENDING
    assert "signed messages: required" in w.output()


def test_a_prod_worker_refuses_to_start_without_a_key(env: Env) -> None:
    done = run_cli(env, "worker", "--tenant", "alpha", extra={"EXECQ_ENV": "prod"}, timeout=60)
    assert done.returncode == 2
    assert "EXECQ_ENV=prod needs signed messages" in done.stderr + done.stdout


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_operators_still_revoke_with_signing_on(signed_env: Env) -> None:
    with signed_env.producer() as producer:
        r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"]))
    done = run_cli(signed_env, "revoke", r.id, "--operator", "alice", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "revoked"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_messages_a_traced_worker_publishes_are_signed_and_accepted(
    signed_env: Env, workers: Start, otlp_sink: OtlpSink
) -> None:
    # Celery's instrumentation writes the current trace context into every message it
    # publishes: what a pool process re-queues (a rollback here) must still verify.
    workers("alpha", extra_env=otlp_sink.env())
    with signed_env.producer() as producer:
        r = producer.submit(
            CommandSpec(
                tenant="alpha",
                argv=["/bin/sh", "-c", "exit 3"],
                compensate=["/bin/true"],
                rollback_on_failure=True,
            )
        )
        wait_for(lambda: producer.get(r.id).state is State.REVERTED, 30, "the rollback")
        assert not _refusals(producer)


def _control_revoke(producer: Producer, command_id: str, **arguments: object) -> None:
    # What anyone who can publish to Redis can send: Celery's own broadcast.
    producer.publisher.app.control.revoke(command_id, terminate=True, **arguments)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_an_unsigned_remote_control_revoke_changes_nothing_and_is_audited(
    signed_env: Env, workers: Start
) -> None:
    workers("alpha", concurrency=1)
    with signed_env.producer() as producer:
        busy = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sleep", "4"]))
        wait_for(lambda: producer.get(busy.id).state is State.RUNNING, 20, "the command to run")
        queued = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", "still runs"]))
        # Unsigned terminate of the running one and revoke of the waiting one: ignored.
        _control_revoke(producer, busy.id)
        _control_revoke(producer, queued.id)
        assert producer.wait(busy.id, timeout=30).state is State.SUCCEEDED
        assert producer.wait(queued.id, timeout=30).state is State.SUCCEEDED
        refused = [
            e
            for e in producer.audit_events(tenant="alpha")
            if e.phase == "revoke" and e.outcome == "refused"
        ]
        assert {e.command_id for e in refused} == {busy.id, queued.id}
        assert all("not signed" in (e.reason or "") for e in refused)
        # Signed with the deployment's key, the same revoke terminates the whole tree.
        slow = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sleep", "30"]))
        wait_for(lambda: producer.get(slow.id).state is State.RUNNING, 20, "the command to run")
        signer = producer.publisher.signer
        assert signer is not None
        _control_revoke(
            producer, slow.id, **signer.sign_control("revoke", [slow.id], terminate=True)
        )
        assert producer.wait(slow.id, timeout=30).state is State.REVOKED
