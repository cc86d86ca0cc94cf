"""Keyed audit chains, signed checkpoints and file heads: each attack performed, each caught."""

from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, text

from producer.audit.events import GENESIS, AuditEvent, Outcome, Phase, Subject, make_event
from producer.audit.jsonl import JsonlSink, read_head, series, verify_file
from producer.audit.keys import AuditKeys
from producer.audit.trail import Trail
from producer.audit.verify import Report
from producer.audit.witness import Witness
from producer.client import Producer
from producer.spec import CommandSpec, cmd_hash
from producer.states import State
from producer.store import audit
from producer.store.db import make_engine
from producer.store.migrate import _config, upgrade
from producer.store.repository import Store
from tests.conftest import Env, run_cli, wait_for
from tests.test_audit_store import drop_guards, spec, subject, submit_events
from tests.test_worker import Start

ROOT = Path(__file__).resolve().parent.parent
KEYS = AuditKeys.derive(b"an audit key of at least 32 bytes!")
OTHER = AuditKeys.derive(b"someone else's key, also 32 bytes")


@pytest.fixture
def witness(tmp_path: Path) -> Path:
    """The witness file `EXECQ_AUDIT_WITNESS` names in this test (see conftest)."""
    return Path(os.environ["EXECQ_AUDIT_WITNESS"])


def fill(store: Store, n: int = 3, tenant: str = "alpha") -> list[str]:
    ids = []
    for i in range(n):
        key = f"{tenant}-{i}-{uuid.uuid4().hex[:8]}"
        created = store.create(spec(key, tenant), actor="alice", events=submit_events(tenant))
        ids.append(created.id)
    return ids


def checkpoint(store: Store, witness: Path) -> None:
    Witness(witness, store.audit.keys()).write(store.audit.checkpoints(None, by="test"))


def verify_witnessed(store: Store, witness: Path, tenant: str | None = None) -> Report:
    latest = store.audit.witnessed(witness)
    assert latest.problem is None, latest.problem
    return store.audit.verify(tenant=tenant, checkpoints=latest.checkpoints)


def rewrite(store: Store, chain: str, keys: AuditKeys | None, *, dropped: bool = False) -> None:
    """Relink every event of `chain` (from its first) with `keys` (None: plain SHA-256), and
    move its head: what someone with database rights but without the audit key can do."""
    events = list(store.audit.events(tenant=chain))
    prev = events[0].prev_hash or GENESIS
    if not dropped:
        drop_guards(store)
    with store.engine.begin() as conn:
        for e in events:
            assert e.seq is not None
            again = e.linked(chain, e.seq, prev, keys)
            conn.execute(
                text(
                    "UPDATE audit_events SET prev_hash = :p, hash = :h "
                    "WHERE chain = :c AND seq = :s"
                ),
                {"p": again.prev_hash, "h": again.hash, "c": chain, "s": e.seq},
            )
            prev = again.hash or ""
        conn.execute(
            text("UPDATE audit_heads SET hash = :h WHERE chain = :c"), {"h": prev, "c": chain}
        )


# --- the store: keyed links ------------------------------------------------------------------


def test_store_links_are_hmacs_under_the_audit_key_on_both_backends(store: Store) -> None:
    created = fill(store, 2)
    store.transition(
        created[0],
        expect_state=State.PENDING,
        expect_version=1,
        to=State.REVOKED,
        actor="op",
        events=[make_event(subject(created[0]), Phase.REVOKE, Outcome.OK, actor="op")],
    )
    keys = store.audit.keys()
    for e in store.audit.events():
        assert e.chain is not None and e.seq is not None and e.prev_hash is not None
        message = f"{e.chain}\n{e.seq}\n{e.prev_hash}\n{e.canonical()}".encode()
        assert e.hash == hmac.new(keys.chain, message, hashlib.sha256).hexdigest()
        assert e.hash != hashlib.sha256(message).hexdigest()
    report = store.audit.verify()
    assert report.ok, report.problem
    assert report.chains["alpha"].unkeyed == 0


def test_a_chain_recomputed_with_plain_sha256_fails_verify(store: Store) -> None:
    fill(store, 3)
    rewrite(store, "alpha", None)
    report = store.audit.verify()
    assert not report.ok and report.problem is not None
    assert (report.problem.chain, report.problem.seq) == ("alpha", 1)
    assert "without the audit key" in report.problem.message
    assert "alpha" in str(report.problem)


def test_a_chain_recomputed_with_another_key_fails_verify(store: Store) -> None:
    fill(store, 3)
    rewrite(store, "alpha", OTHER)
    report = store.audit.verify()
    assert not report.ok and report.problem is not None
    assert report.problem.seq == 1
    assert "another audit key" in report.problem.message


# --- the store: checkpoints against a truncated tail -------------------------------------------


def _cut_tail_with_guards_dropped(store: Store, chain: str, keep: int) -> None:
    drop_guards(store)
    with store.engine.begin() as conn:
        conn.execute(
            text("DELETE FROM audit_events WHERE chain = :c AND seq > :k"), {"c": chain, "k": keep}
        )
        conn.execute(
            text(
                "UPDATE audit_heads SET seq = :k, hash = (SELECT hash FROM audit_events "
                "WHERE chain = :c AND seq = :k) WHERE chain = :c"
            ),
            {"c": chain, "k": keep},
        )


def _cut_tail_with_insert_and_delete_rights(store: Store, chain: str, keep: int) -> None:
    """No DDL: a forged far-away anchor makes the delete trigger let events go, and the head
    row is deleted and inserted again (only UPDATEs of it are guarded)."""
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_anchors (chain, seq, prev_hash, pruned_at, pruned_events, "
                "actor) VALUES (:c, 1000000, :h, CURRENT_TIMESTAMP, 0, 'x')"
            ),
            {"c": chain, "h": "0" * 64},
        )
        conn.execute(
            text("DELETE FROM audit_events WHERE chain = :c AND seq > :k"), {"c": chain, "k": keep}
        )
        conn.execute(text("DELETE FROM audit_anchors WHERE chain = :c"), {"c": chain})
        last = conn.execute(
            text("SELECT hash FROM audit_events WHERE chain = :c AND seq = :k"),
            {"c": chain, "k": keep},
        ).scalar_one()
        conn.execute(text("DELETE FROM audit_heads WHERE chain = :c"), {"c": chain})
        conn.execute(
            text("INSERT INTO audit_heads (chain, seq, hash) VALUES (:c, :k, :h)"),
            {"c": chain, "k": keep, "h": last},
        )


@pytest.mark.parametrize(
    "cut", [_cut_tail_with_guards_dropped, _cut_tail_with_insert_and_delete_rights]
)
def test_events_deleted_after_a_checkpoint_are_caught(
    store: Store, witness: Path, cut: Callable[[Store, str, int], None]
) -> None:
    fill(store, 3)
    fill(store, 1, tenant="beta")
    checkpoint(store, witness)
    cut(store, "alpha", 4)
    # The store alone cannot tell: a shorter chain whose head moved back is consistent.
    assert store.audit.verify().ok
    report = verify_witnessed(store, witness)
    assert not report.ok and report.problem is not None
    assert report.problem.chain == "alpha"
    assert "ends at seq 4 but was checkpointed at seq 6" in report.problem.message
    assert "truncated" in report.problem.message
    # The other tenant's chain is not blamed, and reached its checkpoint.
    beta = verify_witnessed(store, witness, tenant="beta")
    assert beta.ok and beta.chains["beta"].checkpoint == 2


def test_a_chain_whose_events_are_all_deleted_after_a_checkpoint_is_caught(
    store: Store, witness: Path
) -> None:
    fill(store, 2)
    checkpoint(store, witness)
    drop_guards(store)
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events"))
        conn.execute(text("DELETE FROM audit_heads"))
    assert store.audit.verify().ok
    report = verify_witnessed(store, witness)
    assert not report.ok and report.problem is not None
    assert report.problem.chain == "alpha" and "has no events" in report.problem.message


def test_a_chain_rewritten_with_the_key_after_a_checkpoint_differs_from_it(
    store: Store, witness: Path
) -> None:
    # Even someone holding the chain key (say, read off the database server) cannot rewrite
    # what a checkpoint pinned: checkpoints are signed with the other derived key.
    fill(store, 3)
    checkpoint(store, witness)
    drop_guards(store)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET reason = 'nothing' WHERE seq = 2"))
    rewrite(store, "alpha", store.audit.keys(), dropped=True)
    assert store.audit.verify().ok
    report = verify_witnessed(store, witness)
    assert not report.ok and report.problem is not None
    assert report.problem.seq == 6 and "differs from the checkpoint" in report.problem.message


def test_a_forged_checkpoint_in_the_witness_is_refused(store: Store, witness: Path) -> None:
    fill(store, 2)
    checkpoint(store, witness)
    record = json.loads(witness.read_text().splitlines()[0])
    record["seq"] = 2  # pretend the chain ended earlier, so a cut would go unnoticed
    with witness.open("a") as f:
        f.write(json.dumps(record) + "\n")
    latest = store.audit.witnessed(witness)
    assert latest.problem is not None and "not signed" in latest.problem.message


def test_checkpoints_pin_the_seq_and_hash_and_ignore_other_stores(
    store: Store, witness: Path, tmp_path: Path
) -> None:
    fill(store, 2)
    other = Store(make_engine(f"sqlite:///{tmp_path}/other.db"))
    upgrade(other.engine)
    fill(other, 5)
    checkpoint(other, witness)  # another store's chain "alpha", further along
    checkpoint(store, witness)
    report = verify_witnessed(store, witness)
    assert report.ok, report.problem
    assert report.chains["alpha"].checkpoint == 4 and not report.warnings
    other.engine.dispose()


# --- the store: first events removed, prune anchors -------------------------------------------


@pytest.mark.parametrize("mac", [None, "f" * 64, "copied"])
def test_first_events_deleted_behind_a_forged_anchor_are_caught(
    store: Store, mac: str | None
) -> None:
    fill(store, 3)
    store.audit.prune(before=store_now(), actor="ops", tenant="alpha")  # a real, signed anchor
    fill(store, 2)
    events = list(store.audit.events(tenant="alpha"))
    cut = events[2]  # delete up to here; the forged anchor lets the trigger allow it
    assert cut.seq is not None
    if mac == "copied":
        with store.engine.connect() as conn:
            mac = conn.execute(text("SELECT mac FROM audit_anchors")).scalar_one()
    # Insert and delete rights are enough: the trigger lets events below an anchor go.
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_anchors (chain, seq, prev_hash, pruned_at, pruned_events, "
                "actor, mac) VALUES ('alpha', :s, :h, CURRENT_TIMESTAMP, 3, 'ops', :m)"
            ),
            {"s": cut.seq + 1, "h": cut.hash, "m": mac},
        )
        conn.execute(text("DELETE FROM audit_events WHERE seq <= :s"), {"s": cut.seq})
    report = store.audit.verify()
    assert not report.ok and report.problem is not None
    assert report.problem.chain == "alpha" and report.problem.seq == cut.seq + 1
    assert "forged" in report.problem.message


def store_now() -> datetime:
    return datetime.now(UTC)


def test_a_legitimate_prune_writes_a_signed_anchor_and_still_verifies(
    store: Store, witness: Path
) -> None:
    fill(store, 3)
    checkpoint(store, witness)  # at seq 6, which the prune removes
    cutoff = store_now()
    fill(store, 1)
    assert store.audit.prune(before=cutoff, actor="ops") == {"alpha": 6}
    with store.engine.connect() as conn:
        row = conn.execute(text("SELECT seq, prev_hash, mac FROM audit_anchors")).one()
    assert row.mac == store.audit.keys().sign(audit_anchor(row.seq, row.prev_hash))
    report = verify_witnessed(store, witness)
    assert report.ok, report.problem
    assert report.chains["alpha"].first_seq == 7
    checkpoint(store, witness)
    assert verify_witnessed(store, witness).chains["alpha"].checkpoint == 9


def audit_anchor(seq: int, prev_hash: str) -> dict:
    return {"anchor": "alpha", "seq": seq, "prev_hash": prev_hash}


# --- the store: chains written before keyed links -----------------------------------------------


@pytest.fixture
def old_store(database_url: str, tmp_path: Path) -> Iterator[Engine]:
    """A store at the last revision before keyed chains (0005), empty."""
    if database_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path}/old.db"
    else:
        url = database_url
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        engine.dispose()
    engine = make_engine(url)
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
    yield engine
    engine.dispose()


def _write_unkeyed(engine: Engine, chain: str, n: int) -> list[AuditEvent]:
    """What the previous release wrote: plain SHA-256 links, then a prune of the first two."""
    s = Subject("c-old", chain, "alice", cmd_hash(["/bin/true"]), None)
    prev, rows = GENESIS, []
    for seq in range(1, n + 1):
        e = make_event(s, Phase.EXECUTE, Outcome.OK, actor="old", detail={"i": seq})
        e = e.linked(chain, seq, prev)
        prev = e.hash or ""
        rows.append(e)
    with engine.begin() as conn:
        conn.execute(
            audit.events_t.insert(),
            [
                {**audit.row_values(e), "chain": chain, "seq": e.seq, "prev_hash": e.prev_hash}
                | {"hash": e.hash}
                for e in rows
            ],
        )
        conn.execute(
            text("INSERT INTO audit_heads (chain, seq, hash) VALUES (:c, :s, :h)"),
            {"c": chain, "s": n, "h": prev},
        )
        conn.execute(
            text(
                "INSERT INTO audit_anchors (chain, seq, prev_hash, pruned_at, pruned_events, "
                "actor) VALUES (:c, 3, :h, CURRENT_TIMESTAMP, 2, 'ops')"
            ),
            {"c": chain, "h": rows[1].hash},
        )
        conn.execute(text("DELETE FROM audit_events WHERE seq <= 2"))
    return rows


def test_an_old_unkeyed_chain_still_verifies_after_the_upgrade_and_continues_keyed(
    old_store: Engine, witness: Path
) -> None:
    _write_unkeyed(old_store, "alpha", 6)
    upgrade(old_store)
    store = Store(old_store)
    report = store.audit.verify()
    assert report.ok, report.problem
    assert report.chains["alpha"].unkeyed == 4 and report.chains["alpha"].first_seq == 3
    checkpoint(store, witness)  # a legacy head can be checkpointed too
    fill(store, 2)
    report = verify_witnessed(store, witness)
    assert report.ok, report.problem
    assert (report.chains["alpha"].unkeyed, report.chains["alpha"].last_seq) == (4, 10)
    # A new chain in an upgraded store is keyed from its first event.
    fill(store, 1, tenant="beta")
    rewrite(store, "beta", None)
    report = store.audit.verify(tenant="beta")
    assert not report.ok and "without the audit key" in str(report.problem)


def test_the_unkeyed_part_of_a_chain_cannot_be_extended(old_store: Engine, witness: Path) -> None:
    _write_unkeyed(old_store, "alpha", 4)
    upgrade(old_store)
    store = Store(old_store)
    fill(store, 2)
    checkpoint(store, witness)
    # Without DDL rights, the record of where the unkeyed part ends cannot change.
    for sql in (
        "UPDATE audit_legacy SET seq = 100",
        "DELETE FROM audit_legacy",
        "INSERT INTO audit_legacy (chain, seq) VALUES ('beta', 100)",
    ):
        with pytest.raises(Exception, match="audit_legacy"), store.engine.begin() as conn:
            conn.execute(text(sql))
    # With them, raising it to cover a plain rewrite fools the store, not the checkpoint.
    rewrite(store, "alpha", None)
    with store.engine.begin() as conn:
        if store.engine.dialect.name == "postgresql":
            conn.execute(text("DROP TRIGGER audit_legacy_frozen ON audit_legacy"))
        else:
            conn.execute(text("DROP TRIGGER audit_legacy_no_update"))
        conn.execute(text("UPDATE audit_legacy SET seq = 100"))
    assert store.audit.verify().ok
    report = verify_witnessed(store, witness)
    assert not report.ok and report.problem is not None
    assert "audit_legacy" in report.problem.message or "checkpoint" in report.problem.message


# --- workers' checkpoints ----------------------------------------------------------------------


def test_a_watched_trail_checkpoints_each_chain_at_most_every_interval(
    store: Store, witness: Path
) -> None:
    trail = Trail(witness=Witness(witness, store.audit.keys()), checkpoint_s=3600)
    trail.watch(store.audit)
    events = submit_events()
    store.append_events(events)
    trail.copy(events)
    more = submit_events()[:1]
    store.append_events(more)
    trail.copy(more)  # within the interval: no second checkpoint
    lines = [json.loads(x) for x in witness.read_text().splitlines()]
    assert [(r["kind"], r["chain"], r["seq"]) for r in lines] == [("store", "alpha", 2)]
    assert store.audit.keys().signed(lines[0])
    trail.checkpoint_moved(["alpha"])  # a periodic pass: the head moved since
    trail.checkpoint_moved(["alpha"])  # ... and now it did not
    lines = [json.loads(x) for x in witness.read_text().splitlines()]
    assert [r["seq"] for r in lines] == [2, 3]
    assert lines[1]["start"] == 1 and lines[1]["unkeyed"] == 0


def test_a_trail_without_a_witness_writes_no_checkpoints(store: Store, witness: Path) -> None:
    trail = Trail()
    trail.watch(store.audit)
    store.append_events(submit_events())
    trail.copy(submit_events())
    assert not witness.exists()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )


def test_cli_checkpoint_then_verify_names_the_truncated_chain(
    store: Store, database_url: str, tmp_path: Path, witness: Path
) -> None:
    env = {"EXECQ_DATABASE_URL": database_url, "EXECQ_AUDIT_LOG": str(tmp_path / "a.jsonl")}
    fill(store, 3)
    done = _cli("audit", "checkpoint", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["checkpoints"][0] == {
        "kind": "store",
        "chain": "alpha",
        "seq": 6,
        "hash": list(store.audit.events())[-1].hash,
    }
    assert (witness.stat().st_mode & 0o777) == 0o600
    ok = _cli("audit", "verify", "--json", env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["chains"]["alpha"]["checkpoint_seq"] == 6
    _cut_tail_with_guards_dropped(store, "alpha", 5)
    bad = _cli("audit", "verify", env=env)
    assert bad.returncode == 1
    assert "'alpha'" in bad.stdout and "truncated" in bad.stdout


# --- the JSON-lines file: heads and checkpoints --------------------------------------------------


def file_events(n: int, tag: str = "x") -> list[AuditEvent]:
    s = Subject(f"cmd-{tag}", "alpha", "alice", cmd_hash(["/bin/true"]), None)
    return [make_event(s, Phase.EXECUTE, Outcome.OK, actor=tag, detail={"i": i}) for i in range(n)]


def raw_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def keyed_file(tmp_path: Path, witness: Path, n: int = 6, **kwargs: int) -> Path:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path, keys=KEYS, witness=Witness(witness, KEYS), **kwargs)
    for i in range(n):
        sink.append(file_events(1, tag=f"t{i}"))
    return path


def check(path: Path, witness: Path, **kwargs: bool) -> Report:
    return verify_file(path, keys=KEYS, witness=witness, **kwargs)


def test_a_keyed_file_starts_with_a_signed_head_and_is_checkpointed_per_append(
    tmp_path: Path, witness: Path
) -> None:
    path = keyed_file(tmp_path, witness, 3)
    head = read_head(path)
    assert head is not None and KEYS.signed(head)
    assert (head["seq"], head["prev_hash"]) == (1, GENESIS)
    cps = [json.loads(x) for x in witness.read_text().splitlines()]
    assert [(c["kind"], c["seq"], c["series"]) for c in cps] == [
        ("file", 1, head["series"]),
        ("file", 2, head["series"]),
        ("file", 3, head["series"]),
    ]
    report = check(path, witness)
    assert report.ok and report.events == 3 and not report.warnings
    assert report.chains["file"].checkpoint == 3
    assert (path.stat().st_mode & 0o777) == 0o600 and (witness.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("cut", [1, 3])
def test_lines_cut_from_the_end_of_the_file_are_caught(
    tmp_path: Path, witness: Path, cut: int
) -> None:
    path = keyed_file(tmp_path, witness)
    path.write_text("".join(raw_lines(path)[:-cut]))
    assert verify_file(path, keys=KEYS).ok  # without the witness, nothing to tell
    report = check(path, witness)
    assert not report.ok and report.problem is not None
    assert f"ends at seq {6 - cut} but was checkpointed at seq 6" in report.problem.message


@pytest.mark.parametrize("cut", ["head", "head+events", "events"])
def test_lines_cut_from_the_start_of_the_file_are_caught(
    tmp_path: Path, witness: Path, cut: str
) -> None:
    path = keyed_file(tmp_path, witness)
    lines = raw_lines(path)
    kept = {"head": lines[1:], "head+events": lines[3:], "events": lines[:1] + lines[3:]}[cut]
    path.write_text("".join(kept))
    report = check(path, witness)
    assert not report.ok and report.problem is not None
    assert any(w in report.problem.message for w in ("removed", "deleted", "rewritten"))


def test_a_forged_head_in_front_of_a_cut_file_is_caught(tmp_path: Path, witness: Path) -> None:
    path = keyed_file(tmp_path, witness)
    lines = raw_lines(path)
    head = json.loads(lines[0])
    third = json.loads(lines[3])
    forged = {**head, "seq": third["seq"], "prev_hash": third["prev_hash"]}
    forged["mac"] = OTHER.sign(forged)
    path.write_text(json.dumps(forged) + "\n" + "".join(lines[3:]))
    report = check(path, witness)
    assert not report.ok and "not signed with the audit key" in str(report.problem)


def test_a_file_rewritten_with_plain_sha256_and_no_head_is_caught_by_the_witness(
    tmp_path: Path, witness: Path
) -> None:
    path = keyed_file(tmp_path, witness)
    rows = [json.loads(x) for x in raw_lines(path)[1:]]
    prev, out = GENESIS, []
    for row in rows[:-2]:  # drop the last two, relink the rest without the key
        e = AuditEvent.from_json(row).linked("file", row["seq"], prev)
        prev = e.hash or ""
        out.append(json.dumps(e.to_json()) + "\n")
    path.write_text("".join(out))
    assert verify_file(path, keys=KEYS).ok  # looks like a file from before keyed chains
    report = check(path, witness)
    assert not report.ok and "replaced or rewritten" in str(report.problem)


def test_rotation_gives_every_file_a_head_and_only_a_missing_middle_file_is_caught(
    tmp_path: Path, witness: Path
) -> None:
    path = keyed_file(tmp_path, witness, 40, max_bytes=2500, keep=5)
    files = series(path)
    assert len(files) == 6
    heads = [read_head(f) for f in files]
    assert all(h is not None and KEYS.signed(h) for h in heads)
    assert len({h["series"] for h in heads if h}) == 1
    report = check(path, witness)
    assert report.ok, report.problem
    assert report.chains["file"].first_seq > 1 and report.chains["file"].last_seq == 40
    files[0].unlink()  # what rotation does to the oldest file anyway
    assert check(path, witness).ok
    files[2].rename(tmp_path / "elsewhere")  # a file from the middle of the series
    report = check(path, witness)
    assert not report.ok and "missing" in str(report.problem)


def test_a_file_written_before_heads_still_verifies_and_a_keyed_sink_continues_it(
    tmp_path: Path, witness: Path
) -> None:
    path = tmp_path / "audit.jsonl"
    JsonlSink(path).append(file_events(3, tag="old"))  # unkeyed, no head
    assert check(path, witness).ok
    keyed = JsonlSink(path, keys=KEYS, witness=Witness(witness, KEYS))
    cp = keyed.checkpoint()  # `execq audit checkpoint` right after the upgrade
    assert cp is not None and (cp.seq, cp.series) == (3, None)
    assert check(path, witness).ok
    keyed.append(file_events(2, tag="new"))
    assert [f.name for f in series(path)] == ["audit.jsonl.1", "audit.jsonl"]
    assert read_head(path.with_name("audit.jsonl.1")) is None and read_head(path) is not None
    report = check(path, witness)
    assert report.ok, report.problem
    assert (report.chains["file"].unkeyed, report.chains["file"].last_seq) == (3, 5)


def _append_keyed(path: str, witness: str, tag: str, n: int) -> None:
    sink = JsonlSink(
        Path(path), max_bytes=8000, keep=100, keys=KEYS, witness=Witness(Path(witness), KEYS)
    )
    for i in range(n):
        sink.append(file_events(2, tag=f"{tag}-{i}"))


def test_many_processes_appending_keep_one_keyed_chain_across_rotations(
    tmp_path: Path, witness: Path
) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_append_keyed, args=(str(path), str(witness), f"p{k}", 30))
        for k in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    report = check(path, witness)
    assert report.ok, report.problem
    assert report.events == 4 * 30 * 2 and report.chains["file"].checkpoint == 240
    assert len(series(path)) > 3


def test_cli_verify_file_catches_a_cut_tail(tmp_path: Path, witness: Path) -> None:
    db = f"sqlite:///{tmp_path}/execq.db"
    env = {"EXECQ_DATABASE_URL": db, "EXECQ_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    store = Store(make_engine(db))
    upgrade(store.engine)
    keys = store.audit.keys()  # the local key file beside the store, as the CLI finds it
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path, keys=keys, witness=Witness(witness, keys))
    for i in range(4):
        sink.append(file_events(1, tag=f"c{i}"))
    assert _cli("audit", "verify", "--file", str(path), env=env).returncode == 0
    path.write_text("".join(raw_lines(path)[:-1]))
    bad = _cli("audit", "verify", "--file", str(path), env=env)
    assert bad.returncode == 1 and "checkpointed at seq 4" in bad.stdout
    store.engine.dispose()


# --- end to end: real workers --------------------------------------------------------------------


def witness_records(witness: Path) -> list[dict]:
    if not witness.exists():
        return []
    return [json.loads(line) for line in witness.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_workers_checkpoint_the_chains_they_append_to_and_verify_uses_them(
    producer: Producer, workers: Start, env: Env, witness: Path
) -> None:
    workers("alpha")
    ids = [
        producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", str(i)])).id
        for i in range(3)
    ]
    for cid in ids:
        assert producer.wait(cid, timeout=30).state is State.SUCCEEDED
    last = producer.audit_events()[-1]
    wait_for(
        lambda: any(
            r["kind"] == "store" and r["chain"] == "alpha" and r["seq"] == last.seq
            for r in witness_records(witness)
        ),
        15,
        "a worker's checkpoint of the chain's last event",
    )
    assert {r["kind"] for r in witness_records(witness)} == {"store", "file"}
    report = run_cli(env, "audit", "verify", "--json")
    assert report.returncode == 0, report.stdout + report.stderr
    assert json.loads(report.stdout)["chains"]["alpha"]["checkpoint_seq"] == last.seq
    in_file = run_cli(env, "audit", "verify", "--file", str(env.settings.audit_log), "--json")
    assert in_file.returncode == 0, in_file.stdout + in_file.stderr
    assert json.loads(in_file.stdout)["chains"]["file"]["checkpoint_seq"] == 15
