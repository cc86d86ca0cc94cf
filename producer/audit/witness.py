"""Checkpoints: signed records of each chain's head, appended to a witness outside the store.

A chain verifies only from where it starts to where it ends; someone who deletes its last
events and moves its head back leaves a shorter chain that verifies. A checkpoint, signed with
the audit seal key and kept where the store's writers cannot reach (`EXECQ_AUDIT_WITNESS`,
shipped off the host), pins the chain: verify refuses a chain that ends before its last
checkpoint, or holds another hash at the checkpointed seq.

Workers checkpoint a chain after an append when their last checkpoint of it is older than
`EXECQ_AUDIT_CHECKPOINT_S` (a clock read per append, no thread), and their reaper pass
checkpoints it when its head moved; `execq audit checkpoint` writes them on demand.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from producer.audit.appending import append_whole
from producer.audit.keys import AuditKeys
from producer.audit.verify import Problem
from producer.files import private_dir

log = logging.getLogger("execq.audit")

Kind = Literal["store", "file"]
VERSION = 1


def now_iso() -> str:
    """The time a checkpoint or a file head is written, ISO 8601 UTC."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def writer() -> str:
    """Which process wrote a record: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Checkpoint:
    """A chain's head at a moment: `seq` and `hash` of its last event.

    `source` names the chain's home: the store (`sqlite:/abs/path`, `postgresql:dbname`) or a
    JSON-lines file (`host:/abs/path`, with the `series` its heads carry). For a store chain,
    `start` is the seq it may start at (1, or its latest prune anchor) and `unkeyed` the last
    seq that may hold a link written before chains were keyed (0: none).
    """

    kind: Kind
    source: str
    chain: str
    seq: int
    hash: str
    ts: str
    by: str
    start: int = 1
    unkeyed: int = 0
    series: str | None = None

    def position(self) -> tuple[int, str]:
        """(seq, hash): where the chain's head was."""
        return self.seq, self.hash

    def record(self, keys: AuditKeys) -> dict[str, Any]:
        """The signed JSON record of this checkpoint."""
        record: dict[str, Any] = {"v": VERSION}
        for name in _FIELDS:
            record[name] = getattr(self, name)
        record["mac"] = keys.sign(record)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Checkpoint:
        """A checkpoint from its record; ValueError when fields are missing or mistyped."""
        try:
            cp = cls(**{k: record[k] for k in _FIELDS})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a checkpoint ({exc})") from None
        if not isinstance(cp.seq, int) or not isinstance(cp.hash, str):
            raise ValueError("not a checkpoint (seq/hash)")
        return cp


_FIELDS = tuple(f.name for f in fields(Checkpoint))


class Outage:
    """Logs a resource that fails (a file on a full disk) once when it starts failing and once
    when it works again, rather than on every attempt. Thread-safe."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failures = 0  # since it last worked
        self._lock = threading.Lock()

    def failed(self, exc: BaseException, consequence: str) -> None:
        """One more failure: logged as an error when it is the first since it last worked."""
        with self._lock:
            self.failures += 1
            first = self.failures == 1
        if first:
            log.error(
                "%s could not be written (%s): %s; logged once until it works again",
                self.what,
                exc,
                consequence,
            )
        else:
            log.debug("%s still failing: %s", self.what, exc)

    def ok(self) -> bool:
        """It worked: True (and logged) when it had been failing."""
        with self._lock:
            failures, self.failures = self.failures, 0
        if failures:
            log.warning("%s works again after %d failed attempt(s)", self.what, failures)
        return bool(failures)


class Witness:
    """The append-only witness file: one signed checkpoint per line, 0600 in a 0700 directory.

    Each write opens the file with O_APPEND and writes whole lines under an exclusive `flock`
    of the file, so that a log shipper may follow (or rotate) it. A write that fails (a full
    disk) cuts the file back to where it ended: readers never see a partial line.
    """

    def __init__(self, path: Path, keys: AuditKeys) -> None:
        self.path = path
        self.keys = keys

    def write(self, checkpoints: Sequence[Checkpoint]) -> None:
        """Append `checkpoints`; raises OSError when they could not be written."""
        if not checkpoints:
            return
        data = "".join(
            json.dumps(cp.record(self.keys), separators=(",", ":"), ensure_ascii=False) + "\n"
            for cp in checkpoints
        ).encode()
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            append_whole(fd, data)
        finally:
            os.close(fd)  # closing releases the flock


@dataclass
class Latest:
    """What the witness says about some chains: the last checkpoint of each, and any problem."""

    checkpoints: dict[str, Checkpoint]
    matched: int = 0
    problem: Problem | None = None

    def pins(self) -> dict[str, tuple[int, str]]:
        """Per chain, the (seq, hash) its events must reach."""
        return {chain: (cp.seq, cp.hash) for chain, cp in self.checkpoints.items()}


def read_latest(path: Path, keys: AuditKeys, wanted: Callable[[Checkpoint], bool]) -> Latest:
    """The last checkpoint (highest seq) of each chain among the records `wanted` selects.

    A selected record whose signature does not verify is a problem (a forged checkpoint, or a
    witness shared with another key); two checkpoints of one seq with different hashes too
    (the chain was rewritten between them). Lines that are not records are skipped: a witness
    may hold other lines, and a crash may tear the last one.
    """
    latest = Latest({})
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return latest
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                record = json.loads(raw)
                cp = Checkpoint.from_record(record)
            except (ValueError, TypeError):
                continue
            if not wanted(cp):
                continue
            where = f"{path}:{lineno}"
            if not keys.signed(record):
                latest.problem = Problem(
                    where,
                    "checkpoint is not signed with the audit key: the witness was tampered "
                    "with (or is shared with a deployment using another key)",
                    cp.chain,
                    cp.seq,
                )
                return latest
            latest.matched += 1
            best = latest.checkpoints.get(cp.chain)
            if best is None or cp.seq > best.seq:
                latest.checkpoints[cp.chain] = cp
            elif cp.seq == best.seq and cp.hash != best.hash:
                latest.problem = Problem(
                    where,
                    f"two checkpoints of seq {cp.seq} disagree on its hash: the chain was "
                    "rewritten between them",
                    cp.chain,
                    cp.seq,
                )
                return latest
    return latest


class Heads(Protocol):
    """A store whose chain heads can be checkpointed."""

    def checkpoints(self, chains: Collection[str] | None, *, by: str) -> list[Checkpoint]:
        """Checkpoints of the heads of `chains` (None: every chain), as they are now."""
        ...


class Checkpointer:
    """Checkpoints the store chains this process appends to, at most every `interval_s` each."""

    def __init__(self, heads: Heads, witness: Witness, interval_s: float) -> None:
        self.heads = heads
        self.witness = witness
        self.interval_s = interval_s
        self._due: dict[str, float] = {}  # chain -> monotonic time its next checkpoint is due
        self._written: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()
        self._outage = Outage(f"checkpoints of the store's audit chains in {witness.path}")

    def appended(self, chains: Iterable[str]) -> None:
        """After an append to `chains`: checkpoint those whose last checkpoint is too old."""
        now = time.monotonic()
        with self._lock:
            due = [c for c in set(chains) if self._due.get(c, 0.0) <= now]
            for chain in due:
                self._due[chain] = now + self.interval_s
        if due:
            self._write(due, only_moved=False)

    def moved(self, chains: Iterable[str]) -> None:
        """Checkpoint each of `chains` whose head moved since this process last did."""
        self._write(list(chains), only_moved=True)

    def _write(self, chains: list[str], *, only_moved: bool) -> None:
        try:
            found = self.heads.checkpoints(sorted(chains), by=writer())
            if only_moved:
                with self._lock:
                    found = [cp for cp in found if self._written.get(cp.chain) != cp.position()]
            self.witness.write(found)
        except Exception as exc:  # the witness or the store is unavailable: try again later
            self._outage.failed(exc, f"chains {', '.join(sorted(chains))} are checkpointed later")
            return
        self._outage.ok()
        with self._lock:
            for cp in found:
                self._written[cp.chain] = cp.position()
