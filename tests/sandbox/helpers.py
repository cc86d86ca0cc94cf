"""Payloads and process-table checks shared by the sandbox tests."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from workers.sandbox import ExecRequest, Limits, detect_capabilities

PY = "/usr/bin/python3"
CAPS = detect_capabilities()
HAS_CGROUP = bool(CAPS.memory_v1 or CAPS.pids_v1 or CAPS.cgroup_v2)
CAN_CATCH_ESCAPEES = HAS_CGROUP or CAPS.subreaper

LIMITS = Limits(
    timeout_s=10, cpu_s=10, memory_mb=256, processes=64, output_kb=64, file_mb=16, open_files=256
)

# Writes "<name>.pid" atomically into a directory so the test never reads half a number.
PIDFILE = """
import os
def pidfile(d, name, pid=None):
    tmp = os.path.join(d, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(pid or os.getpid()))
    os.rename(tmp, os.path.join(d, name + ".pid"))
"""

# A command with a setsid escapee (keeps the pipes) and a double-fork daemon (closes them).
ESCAPEES = (
    PIDFILE
    + """
import sys, time
d = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    pidfile(d, "setsid")
    time.sleep(60)
    os._exit(0)
first = os.fork()
if first == 0:
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    pidfile(d, "daemon")
    time.sleep(60)
    os._exit(0)
os.waitpid(first, 0)
pidfile(d, "command")
time.sleep(60)
"""
)


def request(
    *argv: str,
    allowed: Iterable[str] | None = None,
    env: dict[str, str] | None = None,
    **limits: Any,
) -> ExecRequest:
    """An ExecRequest that allow-lists its own argv[0] unless told otherwise."""
    return ExecRequest(
        command_id="test",
        argv=tuple(argv),
        allowed_executables=tuple(allowed if allowed is not None else (argv[0],)),
        limits=replace(LIMITS, **limits),
        env=env or {},
    )


def python(code: str, *args: str, **limits: Any) -> ExecRequest:
    """A request running `code` with the system Python."""
    return request(PY, "-c", code, *args, allowed=None, env=None, **limits)


def gone(pid: int) -> bool:
    """True when pid no longer runs (a zombie counts as gone; ours is reaped on the way)."""
    try:
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return True
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return True


def survivors(pids: Iterable[int], timeout_s: float = 3.0) -> list[int]:
    """The pids still running after up to timeout_s."""
    pending = list(pids)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if not gone(p)]
        if pending:
            time.sleep(0.02)
    return pending


def wait_pidfiles(d: Path, names: Iterable[str], timeout_s: float = 10.0) -> dict[str, int]:
    """Wait for each `<name>.pid` written by a payload, and return the pids."""
    deadline = time.monotonic() + timeout_s
    out: dict[str, int] = {}
    for name in names:
        path = d / f"{name}.pid"
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} never appeared")
            time.sleep(0.01)
        out[name] = int(path.read_text())
    return out


def read_pidfiles(d: Path) -> dict[str, int]:
    """Every pid a payload wrote into d."""
    return {p.stem: int(p.read_text()) for p in d.glob("*.pid")}


def execq_cgroups() -> set[str]:
    """Names of execq cgroup directories that exist right now, in any hierarchy we use."""
    names: set[str] = set()
    for parent in (CAPS.memory_v1, CAPS.pids_v1, CAPS.cgroup_v2):
        if parent:
            names.update(n for n in os.listdir(parent) if n.startswith("execq-"))
    return names


# Shared by the payloads that probe what a command can reach: one attempt each, recorded as
# "ok" or the errno it ended with, in `out` (the payload prints it as JSON).
ATTEMPT = """
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as exc:
        out[name] = exc.errno
"""
