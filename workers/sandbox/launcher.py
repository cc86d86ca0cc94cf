"""execq-launch (launch.c): where it is, whether it may be trusted, and what it can do here.

Each ability is tried once, by running it on /bin/true: the only honest test of a kernel
feature (seccomp, fsmount, mount namespaces) is to use it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys
import tempfile

from producer.errors import ExecutableRefused

from .disk import private_disk
from .resolve import check_safe

LAUNCHER = "execq-launch"
LANDLOCK_SIGNAL_ABI = 6
CANNOT_DROP = (
    "commands would keep the worker's capabilities: dropping them needs execq-launch "
    "(`make install` builds it with a C compiler) or setpriv (util-linux)"
)
# Kernel files a uid-0 command without capabilities could still write (owner bits): its
# cgroups (moving out, raising its own limits), sysctls, sysrq. Read-only in its namespace.
KERNEL_FILES = ("/sys", "/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus")


@functools.cache
def kernel_files() -> tuple[str, ...]:
    """Those of KERNEL_FILES this host has (bind mounts need an existing path)."""
    return tuple(path for path in KERNEL_FILES if os.path.exists(path))


def _unsafe(path: str, what: str) -> str | None:
    """Why someone other than root or us could change `path` (the allow-list's own check of
    a file or directory), or None."""
    try:
        check_safe(path, path, os.stat(path), what)
    except OSError as exc:
        return f"cannot stat {path}: {exc.strerror}"
    except ExecutableRefused as exc:
        return str(exc)
    return None


def launcher_candidates() -> list[str]:
    """Where execq-launch may be: EXECQ_LAUNCHER, this environment's libexec, the system's."""
    found = [os.environ.get("EXECQ_LAUNCHER", "")]
    found += [os.path.join(sys.prefix, "libexec", LAUNCHER)]
    found += [f"/usr/local/libexec/{LAUNCHER}", f"/usr/libexec/{LAUNCHER}"]
    return [path for path in found if path]


def find_launcher(notes: list[str]) -> str | None:
    """execq-launch if built and safe, after a trial run.

    Trusted like execq's own code, which lives beside it: the file and its directory must be
    root's or ours and writable by no one else. The directories above are not checked as a
    tenant's executables are: a checkout under /tmp is as safe for the launcher as for the
    Python files the worker runs from it.
    """
    for candidate in launcher_candidates():
        if not os.path.exists(candidate):
            continue
        path = os.path.realpath(candidate)
        problem = _unsafe(path, "file") or _unsafe(os.path.dirname(path), "directory")
        if problem is not None:
            notes.append(f"{candidate} refused: {problem}")
            continue
        trial = [path, "--rlimit", "core=0:0", "--pdeathsig", "--", "/bin/true"]
        try:
            done = subprocess.run(trial, capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            notes.append(f"{candidate} does not run: {exc}")
            continue
        if done.returncode == 0:
            return path
        notes.append(f"{candidate} failed its trial: {done.stderr.decode(errors='replace')}")
    return None


def launcher_filters_sockets(launcher: str, notes: list[str]) -> bool:
    """Whether the launcher's `--no-sockets` seccomp filter installs on this kernel."""
    trial = [launcher, "--pdeathsig", "--no-sockets", "--", "/bin/true"]
    try:
        done = subprocess.run(trial, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        notes.append(f"{launcher} --no-sockets does not run: {exc}")
        return False
    if done.returncode == 0:
        return True
    err = done.stderr.decode(errors="replace").strip()
    notes.append(f"{launcher} --no-sockets failed its trial ({done.returncode}): {err}")
    return False


def launcher_mounts(launcher: str, notes: list[str]) -> bool:
    """Whether `--mount` (a worker-made tmpfs) and `--read-only` work here: one trial run."""
    try:
        disk = private_disk(1)
    except OSError as exc:
        notes.append(f"private tmpfs: {exc}")
        return False
    try:
        with tempfile.TemporaryDirectory(prefix="execq-probe-") as where:
            trial = [launcher, "--mount", f"{disk.fd}:{where}"]
            for path in kernel_files():
                trial += ["--read-only", path]
            trial += ["--", "/bin/true"]
            done = subprocess.run(
                trial, capture_output=True, timeout=10, check=False, pass_fds=(disk.fd,)
            )
    except (OSError, subprocess.TimeoutExpired) as exc:
        notes.append(f"{launcher} --mount does not run: {exc}")
        return False
    finally:
        disk.close()
    if done.returncode == 0:
        return True
    err = done.stderr.decode(errors="replace").strip()
    notes.append(f"{launcher} --mount failed its trial ({done.returncode}): {err}")
    return False


def landlock_abi() -> int:
    """landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION); 0 without it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    version = libc.syscall(444, None, 0, 1)  # one number on every architecture
    return max(int(version), 0)
