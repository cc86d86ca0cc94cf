"""The private directory of one run: its cwd, HOME and TMPDIR, removed whatever happens.

"Whatever happens" includes the pool process being killed mid-run: each directory's name
says which process made it (`<command>-<pid>.<start ticks>-<random>`), and the first run of
every pool process removes those whose maker is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# <command>-<pid>.<start ticks>-<mkdtemp's 8 characters>
_OWNED = re.compile(r"^.+-(\d+)\.(\d+)-[a-z0-9_]{8}$")


@contextlib.contextmanager
def private_dir(root: Path, command_id: str, owner: str = "") -> Iterator[str]:
    """A fresh 0700 directory under root, unique per run (mkdtemp), removed on the way out.

    `owner`: `<pid>.<start ticks>` of the process that makes it, for `sweep_stale_dirs`.
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", command_id)[:48] or "run"
    prefix = f"{safe}-{owner}-" if owner else f"{safe}-"
    path = tempfile.mkdtemp(prefix=prefix, dir=root)
    try:
        yield path
    finally:
        _remove_tree(path)


def _remove_tree(path: str) -> None:
    """rmtree that also gets through directories the command chmod'ed to 000."""

    def retry(func: Callable[..., object], failed: str, _exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
                shutil.rmtree(failed, onerror=retry)  # nested 000 directories too
            else:
                func(failed)

    try:
        os.rmdir(path)  # the common case: the command left nothing behind
        return
    except OSError:
        pass
    shutil.rmtree(path, onerror=retry)
    if os.path.lexists(path):
        log.warning("sandbox: could not remove private directory %s", path)


def sweep_stale_dirs(root: Path, is_alive: Callable[[int, int | None], bool]) -> list[str]:
    """Remove the private directories under `root` whose maker is gone; their names.

    A pool process killed mid-run (SIGKILL, the OOM killer) never reaches its `finally`.
    Directories of live processes (`is_alive(pid, start ticks)`), and names this module did
    not make, stay. This module needs nothing but the standard library: the caller brings
    the check of /proc.
    """
    try:
        names = os.listdir(root)
    except OSError:
        return []
    removed = []
    for name in names:
        m = _OWNED.match(name)
        if m is None:
            continue
        pid, ticks = int(m.group(1)), int(m.group(2))
        if is_alive(pid, ticks or None):
            continue
        _remove_tree(os.path.join(root, name))
        removed.append(name)
    if removed:
        log.warning("sandbox: removed %d private directories of dead processes", len(removed))
    return removed
