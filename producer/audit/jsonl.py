"""The JSON-lines audit file: one chain through a rotated series, signed heads, checkpoints.

Every process on the host appends under one `flock`. With the audit keys, each file starts with
a signed head record (where in the chain it starts, and which series it belongs to), and each
append writes a checkpoint of the chain's new end to the witness: verification then catches
lines cut from either end of a file, as well as any line edited, removed or inserted between.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from producer.audit.appending import append_whole
from producer.audit.events import GENESIS, AuditEvent
from producer.audit.keys import AuditKeys
from producer.audit.verify import Anchor, Problem, Report, Verifier, link_kind
from producer.audit.witness import Checkpoint, Outage, Witness, now_iso, read_latest, writer
from producer.files import private_dir

log = logging.getLogger("execq.audit")

FILE_CHAIN = "file"
HEAD_RECORD = "file_head"
# The last line of a file is found by reading this much of its end (events are far smaller).
_TAIL_BYTES = 256 * 1024
# Events a sink keeps in memory while its file cannot be written (a full disk), at most.
MAX_HELD = 20_000


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def file_source(path: Path) -> str:
    """How checkpoints name a JSON-lines series: host and absolute path of its current file."""
    return f"{socket.gethostname()}:{path.resolve()}"


def read_head(path: Path) -> dict[str, Any] | None:
    """The head record on the first line of `path`, or None (no file, or a file without)."""
    try:
        with path.open("rb") as f:
            first = f.readline(_TAIL_BYTES)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(first)
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("record") == HEAD_RECORD else None


def _last_link(path: Path) -> tuple[int, str] | None:
    """(seq, hash) of the last complete event line of `path`, or None if it has none.

    Reads backwards from the end, a little at a time: an append should not cost a read of
    the whole file.
    """
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return None
    with f:
        size = f.seek(0, os.SEEK_END)
        chunk = 8192
        while True:
            start = max(0, size - chunk)
            f.seek(start)
            lines = f.read(size - start).split(b"\n")
            if start > 0:
                lines = lines[1:]  # the first piece may be the end of a longer line
            for raw in reversed(lines):
                if not raw.strip():
                    continue
                try:
                    data = json.loads(raw)
                    return int(data["seq"]), str(data["hash"])
                except (ValueError, KeyError, TypeError):
                    continue  # a head record, or a torn last write (verify names it)
            if start == 0 or chunk >= _TAIL_BYTES:
                return None
            chunk *= 4


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_ino, st.st_size


class JsonlSink:
    """A JSON-lines file with size-based rotation, shared by every process on the host.

    One chain runs through the whole series (`audit.jsonl.N` … `.1`, `audit.jsonl`): an append
    takes an exclusive `flock` on `<path>.lock`, reads the last link, writes its lines in one
    `write`, and rotates first when the file would pass `max_bytes`. The lock file is opened
    per append, so a forked process never shares a lock with its parent.

    With `keys`, links are keyed, and each file begins with a signed head record naming where
    it starts in the chain (its first seq and prev_hash) and the series it belongs to: lines
    cut from the start of a file leave it starting elsewhere than its head says, or without
    a head. With a `witness`, each append also writes a checkpoint of the file chain's new
    end there, under the same lock: lines cut from the end leave the file short of it.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 64 << 20,
        keep: int = 10,
        keys: AuditKeys | None = None,
        witness: Witness | None = None,
        max_held: int = MAX_HELD,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.keys = keys
        self.witness = witness if keys is not None else None
        self.source = file_source(path)
        self._thread_lock = threading.Lock()
        # (inode, size, last link, series) after this process's own last append: when the
        # file is still exactly so, nobody appended since and its tail need not be read again.
        self._known: tuple[int, int, tuple[int, str], str | None] | None = None
        # Committed events this process could not write yet (the disk was full), in order:
        # the next append, or `flush`, writes them first. Beyond `max_held` the oldest are
        # dropped, counted in `dropped` and logged (the store keeps them all).
        self.max_held = max_held
        self._held: deque[AuditEvent] = deque()
        self.dropped = 0  # since the file last took events
        self.dropped_total = 0
        self._outage = Outage(f"audit file {path}")
        self._witness_outage = Outage(f"checkpoints of {path} in the witness")
        os.register_at_fork(after_in_child=self._reset_after_fork)

    def _reset_after_fork(self) -> None:
        self._thread_lock = threading.Lock()
        self._known = None
        # the parent's held events are the parent's to write
        self._held = deque()
        self.dropped = self.dropped_total = 0
        self._outage = Outage(f"audit file {self.path}")
        self._witness_outage = Outage(f"checkpoints of {self.path} in the witness")

    @property
    def held(self) -> int:
        """Events waiting in this process for the file to take them."""
        return len(self._held)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock, self._flocked():
            yield

    @contextmanager
    def _flocked(self) -> Iterator[None]:
        private_dir(self.path.parent)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def append(self, events: Sequence[AuditEvent]) -> None:
        """Link `events` after the file's last event and append them, after any events held
        from an append that failed.

        An append that fails (ENOSPC, EIO, …) leaves the file as it was, without a partial
        line, and holds its events in memory: the next append, or `flush`, writes them first,
        in order. The first failure is logged as an error, later ones are not until the file
        takes events again.
        """
        with self._thread_lock:
            batch = [*self._held, *events]
            if not batch:
                return
            try:
                with self._flocked():
                    self._write(batch)
            except OSError as exc:
                self._hold(events, exc)
                return
            recovered = len(self._held)
            self._held.clear()
            if self._outage.ok():
                log.warning(
                    "audit file %s takes events again: %d held event(s) appended%s",
                    self.path,
                    recovered,
                    f"; {self.dropped} were dropped (the store has them)" if self.dropped else "",
                )
                self.dropped = 0

    def flush(self) -> int:
        """Append the events held since a failed append now; how many are still held."""
        if self._held:
            self.append([])
        return len(self._held)

    def _hold(self, events: Sequence[AuditEvent], exc: OSError) -> None:
        self._held.extend(events)
        over = len(self._held) - self.max_held
        for _ in range(max(0, over)):
            self._held.popleft()
        self.dropped += max(0, over)
        self.dropped_total += max(0, over)
        self._outage.failed(
            exc,
            f"holding its events in memory ({len(self._held)} now, at most {self.max_held}) "
            "until it can be written; the store has them all",
        )
        if over > 0 and self.dropped == over:
            log.error(
                "audit file %s: more than %d events held, dropping the oldest (the store "
                "has them; `execq audit export` writes them out)",
                self.path,
                self.max_held,
            )

    def _write(self, events: Sequence[AuditEvent]) -> None:
        """Under the lock: link and write `events`; on failure, the file is as it was."""
        try:
            st: os.stat_result | None = self.path.stat()
        except FileNotFoundError:
            st = None
        known = self._known
        unchanged = st is not None and known is not None and known[:2] == _identity(st)
        if unchanged and known is not None:
            head, series = known[2], known[3]
        else:
            head = _last_link(self.path) or _last_link(self._rotated(1)) or (0, GENESIS)
            series = self._series(st)
        seq, prev = head
        first = (seq + 1, prev)
        lines = []
        for event in events:
            seq += 1
            linked = event.linked(FILE_CHAIN, seq, prev, self.keys)
            prev = linked.hash or ""
            lines.append(_line(linked.to_json()))
        data = "".join(lines).encode()
        size = st.st_size if st is not None else 0
        # A keyed chain continues a file written without heads in a new file of its own.
        unheaded = self.keys is not None and series is None
        if size and (size + len(data) > self.max_bytes or unheaded):
            self._rotate()
            size, unchanged = 0, False
        if size == 0 and self.keys is not None:
            series = series or uuid.uuid4().hex
            data = _line(self._head(series, *first)).encode() + data
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            append_whole(fd, data, repair=bool(size) and not unchanged)
            self._known = (*_identity(os.fstat(fd)), (seq, prev), series)
        except BaseException:
            self._known = None
            raise
        finally:
            os.close(fd)
        if self.witness is not None:
            # Still under the lock: the witness sees the file chain's checkpoints in order.
            try:
                self.witness.write([self._checkpoint(seq, prev, series)])
            except OSError as exc:
                self._witness_outage.failed(exc, "the file's end is pinned again later")
            else:
                self._witness_outage.ok()

    def _series(self, st: os.stat_result | None) -> str | None:
        """The series of the current file (of the last rotated one when there is none yet)."""
        head = read_head(self.path if st is not None and st.st_size else self._rotated(1))
        if head is None or self.keys is None or not self.keys.signed(head):
            return None
        series = head.get("series")
        return series if isinstance(series, str) else None

    def _head(self, series: str, seq: int, prev_hash: str) -> dict[str, Any]:
        assert self.keys is not None
        record: dict[str, Any] = {
            "record": HEAD_RECORD,
            "chain": FILE_CHAIN,
            "series": series,
            "seq": seq,
            "prev_hash": prev_hash,
            "ts": now_iso(),
        }
        record["mac"] = self.keys.sign(record)
        return record

    def _checkpoint(self, seq: int, last_hash: str, series: str | None) -> Checkpoint:
        return Checkpoint(
            kind="file",
            source=self.source,
            chain=FILE_CHAIN,
            seq=seq,
            hash=last_hash,
            ts=now_iso(),
            by=writer(),
            series=series,
        )

    def checkpoint(self) -> Checkpoint | None:
        """Write a checkpoint of the file chain's end now (`execq audit checkpoint`)."""
        if self.witness is None:
            return None
        with self._locked():
            link = _last_link(self.path) or _last_link(self._rotated(1))
            if link is None:
                return None
            cp = self._checkpoint(*link, self._series(self._stat()))
            self.witness.write([cp])
            return cp

    def _stat(self) -> os.stat_result | None:
        try:
            return self.path.stat()
        except FileNotFoundError:
            return None

    def _rotated(self, k: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{k}")

    def _rotate(self) -> None:
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
            return
        for k in range(self.keep - 1, 0, -1):
            if self._rotated(k).exists():
                os.replace(self._rotated(k), self._rotated(k + 1))
        os.replace(self.path, self._rotated(1))


def series(path: Path) -> list[Path]:
    """The files of a rotated series, oldest first: `path.N` … `path.1`, `path`."""
    rotated = []
    k = 1
    while path.with_name(f"{path.name}.{k}").exists():
        rotated.append(path.with_name(f"{path.name}.{k}"))
        k += 1
    files = list(reversed(rotated))
    if path.exists():
        files.append(path)
    return files


def missing_from_file(
    path: Path, stored: Callable[[int | None], Iterable[AuditEvent]]
) -> list[AuditEvent]:
    """The events of the store that the series of `path` does not hold.

    `stored(since_ns)` yields the store's events that began at or after `since_ns` (None:
    all), as `Store.audit.events` does; only those since the series' earliest event count,
    since older files may have been rotated away. A file's events are copies that a process
    killed between the store's commit and its copy, or one holding them while the disk was
    full, may never have written.
    """
    ids: set[str] = set()
    since: int | None = None
    for file in series(path):
        with file.open("rb") as f:
            for raw in f:
                try:
                    data = json.loads(raw)
                    event_id, began = str(data["event_id"]), int(data["exec_time_ns"])
                except (ValueError, TypeError, KeyError):
                    continue  # a head record (verify judges anything else)
                ids.add(event_id)
                since = began if since is None else min(since, began)
    return [event for event in stored(since) if event.event_id not in ids]


def verify_file(
    path: Path,
    *,
    allow_anchor: bool = False,
    keys: AuditKeys | None = None,
    witness: Path | None = None,
) -> Report:
    """Verify a JSON-lines file, following its rotated predecessors.

    A file with a head starts where its head says and holds keyed links only; the oldest file
    present may start mid-chain at its signed head (older files were rotated away). A file
    without a head (written before heads, or an export) starts at the genesis, unless
    `allow_anchor` (a partial export) or it is the oldest of a series written before heads.
    With `witness` (and `keys`), the series must reach the last checkpoint of its chain.
    """
    files = series(path)
    verifier = Verifier(str(path), keys=keys, allow_anchor=allow_anchor)
    verifier.report.files = [str(f) for f in files]
    if not files:
        verifier.fail(Problem(str(path), "no such file"))
        return verifier.report
    rotated = len(files) - (1 if path.exists() else 0)
    if path.with_name(f"{path.name}.{rotated + 2}").exists():
        verifier.fail(
            Problem(
                str(path.with_name(f"{path.name}.{rotated + 1}")),
                "a rotated file of the series is missing: the events in it were removed",
                FILE_CHAIN,
            )
        )
        return verifier.report
    heads = [read_head(f) for f in files]
    if witness is not None and keys is not None:
        _pin_to_witness(verifier, path, heads, keys, witness)
    for index, (file, head) in enumerate(zip(files, heads, strict=True)):
        if verifier.report.problem is not None:
            break
        if head is None and any(heads[:index]):
            verifier.fail(
                Problem(
                    str(file),
                    "file has no head record where the series has: its first lines were removed",
                    FILE_CHAIN,
                )
            )
            break
        _verify_one(verifier, file, head, oldest_of_many=index == 0 and len(files) > 1)
    return verifier.finish()


def _pin_to_witness(
    verifier: Verifier,
    path: Path,
    heads: list[dict[str, Any] | None],
    keys: AuditKeys,
    witness: Path,
) -> None:
    """Make the series' last checkpoint in the witness a pin of the file chain."""
    # A file without a head (from before heads) is checkpointed with no series.
    ids = {None if h is None else h.get("series") for h in heads}
    source = file_source(path)

    def ours(cp: Checkpoint) -> bool:
        mine = cp.series is not None and cp.series in ids
        return cp.kind == "file" and (mine or cp.source == source)

    latest = read_latest(witness, keys, ours)
    if latest.problem is not None:
        verifier.fail(latest.problem)
        return
    cp = latest.checkpoints.get(FILE_CHAIN)
    if cp is None:
        if any(heads):  # an export is never checkpointed
            verifier.report.warnings.append(
                f"the witness {witness} holds no checkpoint of this file: lines removed at "
                "its end would go unnoticed"
            )
        return
    if cp.series not in ids:
        verifier.fail(
            Problem(
                str(path),
                f"the witness has checkpoints of this file up to seq {cp.seq} (series "
                f"{cp.series}), which the file does not continue: it was replaced or rewritten",
                FILE_CHAIN,
                cp.seq,
            )
        )
        return
    verifier.pin(FILE_CHAIN, cp.seq, cp.hash)


def _verify_one(
    verifier: Verifier, file: Path, head: dict[str, Any] | None, *, oldest_of_many: bool
) -> None:
    """Feed one file of a series to the verifier; stops at the first problem."""
    first = True
    with file.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{file}:{lineno}"
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
                if isinstance(data, dict) and data.get("record") == HEAD_RECORD:
                    if lineno != 1 or head is None:
                        verifier.fail(
                            Problem(where, "a file head in the middle of a file", FILE_CHAIN)
                        )
                        return
                    if not _check_head(verifier, head, where):
                        return
                    continue
                event = AuditEvent.from_json(data)
            except (ValueError, TypeError) as exc:
                verifier.fail(Problem(where, f"line is not an audit event ({exc})"))
                return
            anchor = None
            if first:
                anchor = _first_event(verifier, event, head, where, oldest_of_many=oldest_of_many)
                if verifier.report.problem is not None:
                    return
            first = False
            if not verifier.feed(event, where, anchor=anchor):
                return


def _check_head(verifier: Verifier, head: dict[str, Any], where: str) -> bool:
    """Whether a file's head is signed and follows the end of the file before it."""
    if verifier.keys is None:
        verifier.fail(Problem(where, "file has a signed head: verify it with the audit key"))
        return False
    if not verifier.keys.signed(head):
        verifier.fail(
            Problem(
                where,
                "file head is not signed with the audit key: it was forged, and the lines "
                "after it are not where the file started",
                FILE_CHAIN,
                head.get("seq") if isinstance(head.get("seq"), int) else None,
            )
        )
        return False
    verifier.require_keyed(FILE_CHAIN)
    last = verifier.last(FILE_CHAIN)
    if last is not None and (head["seq"], head["prev_hash"]) != (last.last_seq + 1, last.last_hash):
        verifier.fail(
            Problem(
                where,
                f"file starts at seq {head['seq']} but the file before it ends at seq "
                f"{last.last_seq}: lines were removed between them",
                FILE_CHAIN,
                head["seq"],
            )
        )
        return False
    return True


def _first_event(
    verifier: Verifier,
    event: AuditEvent,
    head: dict[str, Any] | None,
    where: str,
    *,
    oldest_of_many: bool,
) -> Anchor | None:
    """Check a file's first event against its head; the anchor the chain may start at."""
    if head is not None:
        if (event.seq, event.prev_hash) != (head["seq"], head["prev_hash"]):
            verifier.fail(
                Problem(
                    where,
                    f"file's head says it starts at seq {head['seq']} but its first event is "
                    "another: its first lines were removed",
                    event.chain,
                    event.seq,
                    event.event_id,
                )
            )
            return None
        return Anchor(head["seq"], head["prev_hash"], signed=True)
    well_formed = isinstance(event.chain, str) and isinstance(event.prev_hash, str)
    if oldest_of_many and well_formed and isinstance(event.seq, int) and event.seq > 1:
        # The oldest file of a series rotated before heads existed starts mid-chain.
        try:
            keyed = link_kind(event, verifier.keys)
        except (TypeError, ValueError):
            keyed = None  # the verifier names it
        if keyed:
            verifier.fail(
                Problem(
                    where,
                    "file holds keyed links but no head record: its first lines were removed",
                    event.chain,
                    event.seq,
                    event.event_id,
                )
            )
            return None
        return Anchor(event.seq, event.prev_hash or "", signed=None)
    return None
