"""A command's private directory as a size-limited tmpfs: the `disk_mb` limit.

The worker makes the filesystem (fsopen/fsconfig/fsmount: a mount attached nowhere) and hands
its descriptor to execq-launch, which attaches it on the private directory inside the
command's own mount namespace. The host never sees the mount, nothing is left to unmount
when the command's processes are gone, and the worker keeps the descriptor to tell, after
the run, whether the command filled it. tmpfs lives in memory: what the command writes
there is charged to its memory cgroup as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

from producer.errors import SandboxError

# The new mount API has one set of numbers on every architecture (Linux >= 5.2).
_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 430, 431, 432
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 1, 6
_FSMOUNT_CLOEXEC = 0x1
_MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x2, 0x4
# One inode per 4 KiB of space: a command cannot pin memory with millions of empty files.
INODES_PER_MB = 256


@dataclass
class PrivateDisk:
    """A detached tmpfs of `size_mb` (its mount descriptor), until close()."""

    fd: int
    size_mb: int

    def full(self) -> bool:
        """Whether the command used up the space or the inodes (ENOSPC from then on)."""
        try:
            st = os.fstatvfs(self.fd)
        except OSError:
            return False
        return st.f_bavail == 0 or st.f_favail == 0

    def close(self) -> None:
        """Let the kernel free it (once the command's mount namespace is gone too)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


@functools.cache
def _libc() -> ctypes.CDLL:
    # Loaded once per process: dlopen and symbol look-ups cost 0.1 ms a run (measured).
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def private_disk(size_mb: int, owner: tuple[int, int] | None = None) -> PrivateDisk:
    """A fresh tmpfs of size_mb (0700, owned by `owner` or root); needs CAP_SYS_ADMIN.

    Raises OSError when this kernel or this process cannot make one.
    """
    libc = _libc()
    uid, gid = owner if owner is not None else (0, 0)
    options = {
        "size": f"{size_mb}m",
        "nr_inodes": str(max(size_mb * INODES_PER_MB, 64)),
        "mode": "0700",
        "uid": str(uid),
        "gid": str(gid),
    }
    fs = _check(libc.syscall(_SYS_FSOPEN, b"tmpfs", _FSOPEN_CLOEXEC), "fsopen(tmpfs)")
    try:
        for key, value in options.items():
            done = libc.syscall(
                _SYS_FSCONFIG, fs, _FSCONFIG_SET_STRING, key.encode(), value.encode(), 0
            )
            _check(done, f"tmpfs option {key}={value}")
        _check(libc.syscall(_SYS_FSCONFIG, fs, _FSCONFIG_CMD_CREATE, None, None, 0), "tmpfs")
        attrs = _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
        fd = _check(libc.syscall(_SYS_FSMOUNT, fs, _FSMOUNT_CLOEXEC, attrs), "fsmount")
    finally:
        os.close(fs)
    return PrivateDisk(fd=fd, size_mb=size_mb)


@contextlib.contextmanager
def disk_for_run(
    enabled: bool, size_mb: int, owner: tuple[int, int] | None
) -> Iterator[PrivateDisk | None]:
    """One run's private tmpfs where this host gives one (`enabled`), freed afterwards.

    Pages are charged to the memory cgroup of whoever writes them: the command's.
    """
    if not enabled:
        yield None
        return
    try:
        disk = private_disk(size_mb, owner)
    except OSError as exc:
        # The host claims the limit: never run a command without it.
        raise SandboxError(f"cannot make the private tmpfs: {exc}") from exc
    try:
        yield disk
    finally:
        disk.close()
