"""What the sandbox is asked to run and what it reports back: plain frozen values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """Ceilings for one run; units are in the names."""

    timeout_s: float
    cpu_s: int
    memory_mb: int
    processes: int
    output_kb: int
    file_mb: int
    open_files: int = 256
    # All the command may write in its private directory (HOME, TMPDIR, cwd), in total.
    disk_mb: int = 256


@dataclass(frozen=True)
class FsView:
    """A filesystem of the command's own (bubblewrap); see producer.tenants.FilesystemView."""

    tmp_mb: int = 64
    writable: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExecRequest:
    """One run: argv[0] is an absolute path the caller already checked against policy."""

    command_id: str
    argv: tuple[str, ...]
    allowed_executables: tuple[str, ...]
    limits: Limits
    env: Mapping[str, str] = field(default_factory=dict)
    lang: str = "C.UTF-8"
    # (uid, gid) to run as instead of the worker's own: a tenant's unprivileged identity.
    run_as: tuple[int, int] | None = None
    # False: a network namespace of its own, with nothing in it but a loopback that is down.
    network: bool = True
    # A filesystem view of its own; None runs the command in the host's view.
    filesystem: FsView | None = None


@dataclass(frozen=True)
class ExecResult:
    """How a run ended. `killed` says why execq (or a limit) stopped it, None if it exited;
    `disk` when it failed with its private directory full (ENOSPC: the limit stopped it)."""

    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    stdout_bytes: int
    stderr_bytes: int
    stdout_truncated: bool
    stderr_truncated: bool
    killed: str | None
    duration_s: float
    enforced: Mapping[str, str]
    pid: int
    executable: str
    cpu_s: float | None = None  # user+system CPU of the command (rusage), None if unknown
    peak_memory_bytes: int | None = None  # the memory cgroup's high-water mark, if any
