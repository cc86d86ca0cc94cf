"""Turn argv[0] into the one real file that will be executed, or refuse it.

Only absolute paths are accepted, compared by realpath with the allow-list, and the file and
every directory above it must be safe from tampering by anyone but root (or us).

The allow-list names paths, but what is allowed is the file each one named when this
process first resolved it (the worker pins them at start): an entry that later resolves to
another file — re-pointed, or replaced in place with another inode, size or mtime — is
refused until the worker restarts and pins the new one on purpose.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from producer.errors import ExecutableRefused

_MAX_LINK_HOPS = 40  # the kernel's own limit (ELOOP)

# allow-list entry (as written) -> (the file it resolved to, that file's identity)
_pins: dict[str, tuple[str, tuple[int, ...]]] = {}


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid)


def pin_executables(allowed: Sequence[str]) -> None:
    """Remember which file each allow-list entry names now (an entry missing here is pinned
    when it is first resolved)."""
    for entry in allowed:
        if entry and os.path.isabs(entry) and entry not in _pins:
            real = os.path.realpath(entry)
            try:
                _pins[entry] = (real, _identity(os.stat(real)))
            except OSError:
                continue


def _check_pinned(argv0: str, real: str, st: os.stat_result, allowed: Sequence[str]) -> None:
    for entry in allowed:
        pinned = _pins.get(entry)
        if pinned is None or (pinned[0] != real and os.path.realpath(entry) != real):
            continue
        if pinned[0] != real:
            raise ExecutableRefused(
                f"refused {argv0}: the allow-listed {entry} resolved to {pinned[0]} when this "
                f"worker started and now resolves to {real}; restart the worker to accept it"
            )
        if pinned[1] != _identity(st):
            raise ExecutableRefused(
                f"refused {argv0}: {real} was replaced or modified since this worker started "
                "(another inode, size, mtime, mode or owner); restart the worker to accept it"
            )


def resolve_executable(argv0: str, allowed: Sequence[str]) -> str:
    """Return the realpath of argv0 if it is allow-listed and safe; raise ExecutableRefused."""
    if not argv0:
        raise ExecutableRefused("refused '': argv[0] is empty")
    if "\x00" in argv0:
        raise ExecutableRefused(f"refused {argv0!r}: argv[0] contains a NUL byte")
    if not os.path.isabs(argv0):
        kind = "a relative path" if "/" in argv0 else "a bare name"
        raise ExecutableRefused(
            f"refused {argv0!r}: {kind}; argv[0] must be an absolute path (nothing is searched)"
        )
    real = os.path.realpath(argv0)
    allowed_real = {os.path.realpath(a) for a in allowed if a and os.path.isabs(a)}
    if real not in allowed_real:
        if real != os.path.normpath(argv0):
            raise ExecutableRefused(
                f"refused {argv0}: it resolves to {real}, which is not in the allow-list"
            )
        raise ExecutableRefused(f"refused {argv0}: not in the allow-list")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise ExecutableRefused(f"refused {argv0}: {real} does not exist") from None
    except OSError as exc:
        raise ExecutableRefused(f"refused {argv0}: cannot stat {real}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ExecutableRefused(f"refused {argv0}: {real} is not a regular file")
    if not st.st_mode & 0o111 or not os.access(real, os.X_OK):
        raise ExecutableRefused(f"refused {argv0}: {real} is not executable")
    check_safe(argv0, real, st, "file")
    _check_parents(argv0, real)
    _check_link_dirs(argv0)
    pin_executables(allowed)
    _check_pinned(argv0, real, st, allowed)
    return real


def check_safe(argv0: str, path: str, st: os.stat_result, what: str) -> None:
    """Refuse a path that someone other than root or us could modify (ExecutableRefused)."""
    if st.st_uid not in (0, os.geteuid()):
        raise ExecutableRefused(
            f"refused {argv0}: {what} {path} is owned by uid {st.st_uid}, not root or us"
        )
    if st.st_mode & stat.S_IWOTH:
        raise ExecutableRefused(f"refused {argv0}: {what} {path} is world-writable")
    if st.st_mode & stat.S_IWGRP:
        raise ExecutableRefused(f"refused {argv0}: {what} {path} is group-writable")


def _check_parents(argv0: str, real: str) -> None:
    """Every directory above the file: a writable one would let the file be swapped."""
    parent = os.path.dirname(real)
    while True:
        try:
            st = os.stat(parent)
        except OSError as exc:
            raise ExecutableRefused(
                f"refused {argv0}: cannot stat directory {parent}: {exc.strerror}"
            ) from None
        check_safe(argv0, parent, st, "parent directory")
        up = os.path.dirname(parent)
        if up == parent:
            return
        parent = up


def _check_link_dirs(argv0: str) -> None:
    """A symlink on the way can be re-pointed by whoever can write the directory holding it."""
    path = argv0
    for _ in range(_MAX_LINK_HOPS):
        directory = os.path.realpath(os.path.dirname(path))
        link = os.path.join(directory, os.path.basename(path))
        if not os.path.islink(link):
            return
        _check_parents(argv0, link)
        target = os.readlink(link)
        path = target if os.path.isabs(target) else os.path.join(directory, target)
    raise ExecutableRefused(f"refused {argv0}: too many levels of symbolic links")
