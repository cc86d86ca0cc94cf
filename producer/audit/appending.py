"""Appending whole lines to a JSON-lines file that readers may read at any moment."""

from __future__ import annotations

import contextlib
import os


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def append_whole(fd: int, data: bytes, *, repair: bool = True) -> None:
    """Append `data` to `fd` (opened O_APPEND, under the writers' lock) all or nothing.

    With `repair`, a file whose last line was torn (a writer killed mid-write) gets a newline
    first, so `data` starts on a line of its own. When a write fails (ENOSPC: a full disk)
    the file is cut back to where it ended: readers never see a partial line, and the next
    attempt appends whole lines after the last complete one.
    """
    start = os.fstat(fd).st_size
    if repair and not _ends_with_newline(fd):
        data = b"\n" + data  # after a torn write, start on a line of our own
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise
