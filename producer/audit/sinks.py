"""Where audit events go besides the store: a small protocol, in-memory and JSON-lines sinks.

The store is the primary sink and is written in the same transaction as the state change it
records (see `producer.store.audit`). Other sinks receive the same events after that commit;
each links them into its own chain.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from producer.audit.events import GENESIS, AuditEvent
from producer.audit.verify import Problem, Report, Verifier
from producer.files import private_dir

FILE_CHAIN = "file"
# The last line of a file is found by reading this much of its end (events are far smaller).
_TAIL_BYTES = 256 * 1024


class AuditSink(Protocol):
    """Something that appends audit events to a chain of its own."""

    def append(self, events: Sequence[AuditEvent]) -> None:
        """Link and append `events` in order; raises OSError when they could not be kept."""
        ...


class MemorySink:
    """An in-memory sink with one chain per tenant, for unit tests."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self._heads: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()

    def append(self, events: Sequence[AuditEvent]) -> None:
        """Link each event into its tenant's chain."""
        with self._lock:
            for event in events:
                seq, prev = self._heads.get(event.tenant, (0, GENESIS))
                linked = event.linked(event.tenant, seq + 1, prev)
                self._heads[event.tenant] = (seq + 1, linked.hash or "")
                self.events.append(linked)


def _line(event: AuditEvent) -> str:
    return json.dumps(event.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n"


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
                    continue  # a torn last write; verify will name it
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
    """

    def __init__(self, path: Path, *, max_bytes: int = 64 << 20, keep: int = 10) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._thread_lock = threading.Lock()
        # (inode, size, last link) after this process's own last append: when the file is
        # still exactly so, nobody appended since and its tail need not be read again.
        self._known: tuple[int, int, tuple[int, str]] | None = None
        os.register_at_fork(after_in_child=self._reset_after_fork)

    def _reset_after_fork(self) -> None:
        self._thread_lock = threading.Lock()
        self._known = None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        private_dir(self.path.parent)
        with self._thread_lock:
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def append(self, events: Sequence[AuditEvent]) -> None:
        """Link `events` after the file's last event and append them."""
        if not events:
            return
        with self._locked():
            try:
                st: os.stat_result | None = self.path.stat()
            except FileNotFoundError:
                st = None
            known = self._known
            unchanged = st is not None and known is not None and known[:2] == _identity(st)
            if unchanged and known is not None:
                head = known[2]
            else:
                head = _last_link(self.path) or _last_link(self._rotated(1)) or (0, GENESIS)
            seq, prev = head
            lines = []
            for event in events:
                seq += 1
                linked = event.linked(FILE_CHAIN, seq, prev)
                prev = linked.hash or ""
                lines.append(_line(linked))
            data = "".join(lines).encode()
            size = st.st_size if st is not None else 0
            if size and size + len(data) > self.max_bytes:
                self._rotate()
                size, unchanged = 0, False
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if size and not unchanged and not _ends_with_newline(fd):
                    data = b"\n" + data  # after a torn write, start on a line of our own
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                self._known = (*_identity(os.fstat(fd)), (seq, prev))
            except BaseException:
                self._known = None
                raise
            finally:
                os.close(fd)

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


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


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


def verify_file(path: Path, *, allow_anchor: bool = False) -> Report:
    """Verify a JSON-lines file, following its rotated predecessors.

    The oldest file of a rotated series may start after an anchor (older files were rotated
    away); a lone file must start at the genesis unless `allow_anchor` (a partial export).
    """
    files = series(path)
    verifier = Verifier(str(path), allow_anchor=allow_anchor or len(files) > 1)
    verifier.report.files = [str(f) for f in files]
    if not files:
        verifier.fail(Problem(str(path), "no such file"))
        return verifier.report
    for file in files:
        with file.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{file}:{lineno}"
                if not raw.strip():
                    continue
                try:
                    event = AuditEvent.from_json(json.loads(raw))
                except (ValueError, TypeError) as exc:
                    verifier.fail(Problem(where, f"line is not an audit event ({exc})"))
                    return verifier.report
                if not verifier.feed(event, where):
                    return verifier.report
    return verifier.report
