"""The audit file and the witness on a full disk: no partial line, events held and appended
once there is space again, one error logged per outage, the chain and checkpoints verify."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.audit.events import Outcome, Phase, Subject, make_event
from producer.audit.jsonl import JsonlSink, verify_file
from producer.audit.keys import AuditKeys
from producer.audit.trail import Trail
from producer.audit.witness import Checkpoint, Checkpointer, Witness, now_iso
from producer.spec import cmd_hash

KEYS = AuditKeys.derive(b"an audit key of at least 32 bytes!")


def events(n: int, tag: str = "x") -> list:
    s = Subject(f"cmd-{tag}", "alpha", "alice", cmd_hash(["/bin/true"]), None)
    return [
        make_event(s, Phase.EXECUTE, Outcome.OK, actor=tag, detail={"i": i, "pad": "p" * 300})
        for i in range(n)
    ]


class Disk:
    """os.write that, while `full`, writes part of what it is given and then fails ENOSPC,
    as a write crossing into a page the filesystem no longer has does."""

    def __init__(self) -> None:
        self.full = False
        self.failures = 0
        self._write = os.write

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if not self.full:
            return self._write(fd, data)
        self.failures += 1
        if len(data) > 1 and self.failures % 2:
            return self._write(fd, bytes(data[: len(data) // 2]))  # a partial write
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    d = Disk()
    monkeypatch.setattr(os, "write", d.write)
    return d


def whole_lines(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "the file ends in a partial line"
    return [json.loads(line) for line in raw.splitlines()]  # raises on a torn line


def test_a_full_disk_leaves_no_partial_line_and_held_events_follow_when_space_returns(
    tmp_path: Path, disk: Disk, caplog: pytest.LogCaptureFixture
) -> None:
    path, witness = tmp_path / "audit.jsonl", tmp_path / "witness.jsonl"
    sink = JsonlSink(path, keys=KEYS, witness=Witness(witness, KEYS))
    sink.append(events(3, "before"))
    disk.full = True
    with caplog.at_level(logging.DEBUG, logger="execq.audit"):
        for i in range(6):
            sink.append(events(2, f"during{i}"))  # never raises: the store has them
        assert sink.held == 12
        assert len(whole_lines(path)) == 1 + 3  # the head and the first events, nothing torn
        disk.full = False
        sink.append(events(1, "after"))
    assert sink.held == 0
    rows = whole_lines(path)
    actors = [r["actor"] for r in rows[1:]]
    assert actors == ["before"] * 3 + [f"during{i}" for i in range(6) for _ in range(2)] + ["after"]
    assert [r["seq"] for r in rows[1:]] == list(range(1, 17))
    report = verify_file(path, keys=KEYS, witness=witness)
    assert report.ok, report.problem
    assert report.events == 16
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]  # once, not per append
    assert "No space left on device" in errors[0].getMessage()
    assert any("takes events again: 12 held" in r.getMessage() for r in caplog.records)


def test_flush_writes_held_events_without_a_new_append(tmp_path: Path, disk: Disk) -> None:
    path = tmp_path / "audit.jsonl"
    trail = Trail([JsonlSink(path, keys=KEYS)])
    disk.full = True
    trail.copy(events(4))
    assert trail.flush() == 4
    disk.full = False
    assert trail.flush() == 0
    assert len(whole_lines(path)) == 1 + 4
    assert verify_file(path, keys=KEYS).ok


def test_held_events_are_bounded_and_the_drop_is_logged(
    tmp_path: Path, disk: Disk, caplog: pytest.LogCaptureFixture
) -> None:
    sink = JsonlSink(tmp_path / "audit.jsonl", keys=KEYS, max_held=5)
    disk.full = True
    sink.append(events(4, "a"))
    sink.append(events(4, "b"))
    assert (sink.held, sink.dropped) == (5, 3)
    assert any("dropping the oldest" in r.getMessage() for r in caplog.records)
    disk.full = False
    sink.flush()
    rows = whole_lines(tmp_path / "audit.jsonl")
    assert [r["actor"] for r in rows[1:]] == ["a"] + ["b"] * 4
    assert any("3 were dropped" in r.getMessage() for r in caplog.records)


def test_a_full_disk_on_a_new_file_after_rotation_leaves_it_empty(
    tmp_path: Path, disk: Disk
) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path, keys=KEYS, max_bytes=2000, keep=3)
    sink.append(events(3, "a"))
    disk.full = True
    sink.append(events(3, "b"))  # rotates, then the new file's head cannot be written
    assert path.read_bytes() == b""
    disk.full = False
    sink.append(events(1, "c"))
    assert verify_file(path, keys=KEYS).ok


def cp(seq: int) -> Checkpoint:
    return Checkpoint("file", "host:/x", "file", seq, f"{seq:064x}", now_iso(), "test")


def test_a_witness_write_on_a_full_disk_leaves_no_partial_line(tmp_path: Path, disk: Disk) -> None:
    witness = Witness(tmp_path / "witness.jsonl", KEYS)
    witness.write([cp(1)])
    disk.full = True
    for seq in (2, 3):
        with pytest.raises(OSError, match="No space"):
            witness.write([cp(seq)])
    disk.full = False
    witness.write([cp(4)])
    assert [r["seq"] for r in whole_lines(witness.path)] == [1, 4]


def test_a_witness_torn_by_a_crash_gets_its_next_line_on_a_line_of_its_own(
    tmp_path: Path,
) -> None:
    witness = Witness(tmp_path / "witness.jsonl", KEYS)
    witness.write([cp(1)])
    with witness.path.open("ab") as f:
        f.write(b'{"v":1,"kind":"fi')  # a writer killed mid-line
    witness.write([cp(2)])
    lines = witness.path.read_bytes().splitlines()
    assert json.loads(lines[-1])["seq"] == 2


class Heads:
    def checkpoints(self, chains: object, *, by: str) -> list[Checkpoint]:
        return [cp(7)]


def test_failing_store_checkpoints_are_logged_once_per_outage(
    tmp_path: Path, disk: Disk, caplog: pytest.LogCaptureFixture
) -> None:
    checkpointer = Checkpointer(Heads(), Witness(tmp_path / "w.jsonl", KEYS), 0.0)
    disk.full = True
    for _ in range(5):
        checkpointer.moved(["alpha"])
    assert sum(r.levelno >= logging.ERROR for r in caplog.records) == 1
    disk.full = False
    checkpointer.moved(["alpha"])
    assert any("works again after 5" in r.getMessage() for r in caplog.records)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="mounts a tmpfs (root only)"
)
def test_a_real_full_tmpfs(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "256k") as disk:
        path, witness = disk / "audit.jsonl", disk / "witness.jsonl"
        sink = JsonlSink(path, keys=KEYS, witness=Witness(witness, KEYS))
        sink.append(events(5, "a"))
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 1024)
        os.close(fd)
        for i in range(20):
            sink.append(events(3, f"b{i}"))
        assert sink.held > 0
        whole_lines(path)
        whole_lines(witness)
        filler.unlink()
        sink.flush()
        assert sink.held == 0
        rows = whole_lines(path)
        assert len(rows) == 1 + 5 + 60
        report = verify_file(path, keys=KEYS, witness=witness)
        assert report.ok, report.problem


def test_the_backlog_is_measured_for_the_metrics(tmp_path: Path, disk: Disk) -> None:
    from prometheus_client import REGISTRY

    from workers.metrics import metrics

    trail = Trail([JsonlSink(tmp_path / "audit.jsonl", keys=KEYS, max_held=3)])
    disk.full = True
    trail.copy(events(5))
    assert trail.backlog() == (3, 2)
    assert trail.backlog() == (3, 0)  # dropped: counted once
    metrics().audit_file("diskfull", (3, 2))
    held = REGISTRY.get_sample_value("execq_audit_file_held_events", {"tenant": "diskfull"})
    dropped = REGISTRY.get_sample_value(
        "execq_audit_file_dropped_events_total", {"tenant": "diskfull"}
    )
    assert (held, dropped) == (3, 2)
    disk.full = False
    trail.flush()
    assert trail.backlog() == (0, 0)


def test_missing_from_file_names_the_store_s_events_the_file_lacks(
    tmp_path: Path, disk: Disk
) -> None:
    from producer.audit.jsonl import missing_from_file

    path = tmp_path / "audit.jsonl"
    old, kept, lost = events(2, "old"), events(3, "kept"), events(2, "lost")
    sink = JsonlSink(path, keys=KEYS, max_held=0)  # holds nothing: a failed append is lost
    sink.append(kept)
    disk.full = True
    sink.append(lost)
    disk.full = False
    store = [*old, *kept, *lost]
    asked: list[int | None] = []

    def stored(since_ns: int | None) -> list:
        asked.append(since_ns)
        return [e for e in store if since_ns is None or e.exec_time_ns >= since_ns]

    missing = missing_from_file(path, stored)
    assert asked == [min(e.exec_time_ns for e in kept)]  # older events may be rotated away
    assert [e.event_id for e in missing] == [e.event_id for e in lost]
    sink.append(lost)
    assert missing_from_file(path, stored) == []


def test_cli_verify_file_complete_names_what_the_file_misses(tmp_path: Path) -> None:
    import sys

    from producer.store.db import make_engine
    from producer.store.migrate import upgrade
    from producer.store.repository import Store
    from tests.test_audit_store import spec, submit_events

    db = f"sqlite:///{tmp_path}/execq.db"
    path = tmp_path / "audit.jsonl"
    env = {**os.environ, "EXECQ_DATABASE_URL": db, "EXECQ_AUDIT_LOG": str(path)}
    env["EXECQ_AUDIT_WITNESS"] = str(tmp_path / "witness.jsonl")
    store = Store(make_engine(db))
    upgrade(store.engine)
    try:
        for i in range(3):
            store.create(spec(f"k{i}", "alpha"), actor="alice", events=submit_events("alpha"))
        stored = list(store.audit.events())
        sink = JsonlSink(path, keys=store.audit.keys())
        sink.append(stored[:4])  # the last command's two events never reached the file

        def verify(*extra: str) -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, "-m", "workers.cli", "audit", "verify", "--file", str(path)]
            return subprocess.run(
                [*argv, "--complete", *extra], capture_output=True, text=True, env=env, check=False
            )

        short = verify("--json")
        assert short.returncode == 1, short.stdout + short.stderr
        problem = json.loads(short.stdout)["problem"]
        assert "misses 2 event(s)" in problem["message"]
        assert "execq audit export --since" in problem["message"]
        assert (problem["chain"], problem["seq"]) == ("alpha", 5)
        assert "INCOMPLETE" in verify().stdout  # not tampered with: short of the store
        sink.append(stored[4:])
        assert verify().returncode == 0
    finally:
        store.engine.dispose()
