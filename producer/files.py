"""Files execq creates for itself (the SQLite store, the audit log): private to its user.

A directory execq makes is 0700 and a file 0600, whatever the umask, so that a tenant's
command running as another uid on the same host cannot read another tenant's records.
Paths that already exist are left as their owner set them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> None:
    """Create `path` and any missing parents, each one made here 0700."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            directory.mkdir(mode=DIR_MODE)
            os.chmod(directory, DIR_MODE)  # mkdir's mode is masked by the umask


def private_file(path: Path) -> None:
    """Create `path` empty and 0600 (in a private directory) unless it exists already."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return
    os.fchmod(fd, FILE_MODE)
    os.close(fd)


def readable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether a process with this uid and gid (no capabilities) could read `path`.

    Every directory on the way must let it search, and the file itself let it read, by the
    owner, group or other bits that apply to it (a missing path is not readable).
    """
    try:
        target = path.resolve(strict=True)
    except OSError:
        return False
    for step in (*reversed(target.parents), target):
        st = step.stat()
        need = 0o4 if step == target else 0o1  # read the file, search each directory
        if st.st_uid == uid:
            bits = (st.st_mode >> 6) & 0o7
        elif st.st_gid == gid:
            bits = (st.st_mode >> 3) & 0o7
        else:
            bits = st.st_mode & 0o7
        if not bits & need:
            return False
    return True
