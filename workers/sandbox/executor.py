"""Run one command in the sandbox: resolve, private dir, clean env, limits, capture, kill, reap.

Every run ends with nothing of the command left: on a timeout or cancel the process group gets
SIGTERM, then SIGKILL, then the cgroup is emptied (catching setsid/double-fork escapees); on a
normal exit whatever the command left running is killed the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from producer.errors import IsolationUnavailable, SandboxError

from . import orphans
from .capabilities import Capabilities, detect_capabilities
from .capture import Captured, capture
from .cgroup import CgroupManager, CgroupSlot
from .cgroup import sweep_stale as _sweep
from .disk import PrivateDisk, disk_for_run
from .model import ExecRequest, ExecResult, Limits
from .procfs import boot_ticks_now, is_alive, start_ticks
from .resolve import resolve_executable
from .workdir import private_dir, sweep_stale_dirs
from .wrapper import MiB, apply_after_spawn, build_launch

log = logging.getLogger(__name__)

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_FIXED_ENV = frozenset({"PATH", "HOME", "TMPDIR"})
_REAP_WAIT_S = 5.0
# (workdir root, pid) -> the owner mark of that process's private directories. The first run
# of each process under a root also removes the directories of processes that died mid-run.
_OWNERS: dict[tuple[str, int], str] = {}


class Sandbox:
    """Runs commands one per call (thread-safe; each concurrent run gets its own cgroup)."""

    def __init__(
        self,
        *,
        workdir_root: Path,
        capabilities: Capabilities | None = None,
        term_grace_s: float = 0.5,
        exit_grace_s: float = 0.5,
        required: Collection[str] = (),
    ) -> None:
        """`required`: limit names (`memory`, `kill`, ...) that must not be best-effort here."""
        self.capabilities = capabilities or detect_capabilities()
        self.required = frozenset(required)
        _check_required(self.required, self.capabilities.mechanisms())
        self.workdir_root = Path(workdir_root)
        self.workdir_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.term_grace_s = term_grace_s
        self.exit_grace_s = exit_grace_s
        self._cgroups = CgroupManager(self.capabilities)
        self._closed = False
        # Slots are removed at interpreter exit too; a crash leaves them to sweep_stale().
        self._finalizer = weakref.finalize(self, self._cgroups.close)

    def close(self) -> None:
        """Remove this process's cgroups; later runs are refused."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        req: ExecRequest,
        *,
        cancel: threading.Event | None = None,
        on_spawn: Callable[[int], None] | None = None,
    ) -> ExecResult:
        """Run `req` to completion (or its limits); raises ExecutableRefused / SandboxError."""
        if self._closed:
            raise SandboxError("the sandbox is closed")
        if not req.argv:
            raise SandboxError("argv is empty")
        exe = resolve_executable(req.argv[0], req.allowed_executables)
        _check_request(req)
        subreaper = orphans.ensure_subreaper(self.capabilities)
        own_disk = self.capabilities.mounts_privately
        with (
            private_dir(self.workdir_root, req.command_id, self._owner()) as workdir,
            self._slot() as slot,
            disk_for_run(own_disk, req.limits.disk_mb, req.run_as) as disk,
        ):
            if req.run_as is not None:
                self._hand_over(workdir, req.run_as)
            return self._run(
                req,
                exe,
                workdir,
                slot,
                disk,
                subreaper=subreaper,
                cancel=cancel,
                on_spawn=on_spawn,
            )

    def _owner(self) -> str:
        """`<pid>.<start ticks>` of this process, for the names of its private directories."""
        key = (str(self.workdir_root), os.getpid())
        owner = _OWNERS.get(key)
        if owner is None:
            sweep_stale_dirs(self.workdir_root, is_alive)
            owner = _OWNERS[key] = f"{os.getpid()}.{start_ticks(os.getpid()) or 0}"
        return owner

    def _hand_over(self, workdir: str, run_as: tuple[int, int]) -> None:
        """Give the private directory to the run's uid; the root only lets it pass through.

        0711 on the root: a uid reaches its own directory by name but cannot list the root
        to find another run's (each private directory stays 0700, owned by its uid).
        """
        try:
            os.chmod(self.workdir_root, 0o711)  # noqa: S103 (traverse only, see above)
            os.chown(workdir, *run_as)
        except OSError as exc:
            raise SandboxError(f"cannot hand {workdir} to uid {run_as[0]}: {exc}") from exc

    @contextlib.contextmanager
    def _slot(self) -> Iterator[CgroupSlot | None]:
        """This process's cgroup for one run; given back only if the run left it empty."""
        try:
            slot = self._cgroups.acquire()
        except OSError as exc:
            log.warning("sandbox: cgroups unavailable for this run: %s", exc)
            slot = None
        if slot is None:
            yield None
            return
        try:
            yield slot
        finally:
            self._cgroups.release(slot, reusable=slot.kill() and not slot.broken)

    def _run(
        self,
        req: ExecRequest,
        exe: str,
        workdir: str,
        slot: CgroupSlot | None,
        disk: PrivateDisk | None,
        *,
        subreaper: bool,
        cancel: threading.Event | None,
        on_spawn: Callable[[int], None] | None,
    ) -> ExecResult:
        limits = req.limits
        caps = self.capabilities
        has_v1 = slot is not None and bool(slot.memory or slot.pids)
        has_kill = slot is not None and slot.v2 is not None and caps.cgroup_kill
        kill_label = caps.kill_label(v2=has_kill, v1=has_v1)
        if not subreaper:
            kill_label = kill_label.replace("+subreaper", "")
        launch = build_launch(
            exe,
            req.argv[1:],
            limits,
            caps,
            memory_cgroup=slot is not None and slot.memory is not None,
            pids_cgroup=slot is not None and slot.pids is not None,
            kill=kill_label,
            run_as=req.run_as,
            network=req.network,
            filesystem=req.filesystem,
            workdir=workdir,
            disk_fd=None if disk is None else disk.fd,
        )
        _check_required(self.required, launch.enforced)
        env = _child_env(req, workdir)
        oom_before: int | None = None
        if slot is not None:
            try:
                slot.set_limits(limits.memory_mb * MiB, limits.processes)
            except OSError as exc:
                slot.broken = True
                raise SandboxError(f"cannot set cgroup limits in {slot.name}: {exc}") from exc
            oom_before = slot.oom_kills()

        proc: subprocess.Popen[bytes] | None = None
        # Everything the command forks starts at or after this tick (one tick of slack).
        ticks = boot_ticks_now() - 1
        spawning = slot.spawning(limits.processes) if slot else contextlib.nullcontext(_noop)
        try:
            with spawning as adopt:
                try:
                    proc = subprocess.Popen(
                        launch.argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        cwd=workdir,
                        env=env,
                        close_fds=True,
                        pass_fds=() if disk is None else (disk.fd,),
                        process_group=0,
                    )
                except OSError as exc:
                    raise SandboxError(f"cannot start {exe}: {exc}") from exc
                orphans.register(proc.pid, ticks)
                adopt(proc.pid)
            started = time.monotonic()
            if launch.after_spawn:
                apply_after_spawn(proc.pid, launch.after_spawn)
            if on_spawn is not None:
                on_spawn(proc.pid)
            assert proc.stdout is not None and proc.stderr is not None
            pid = proc.pid
            captured = capture(
                pid=pid,
                stdout_fd=proc.stdout.fileno(),
                stderr_fd=proc.stderr.fileno(),
                cap_bytes=limits.output_kb * 1024,
                deadline=started + limits.timeout_s,
                cancel=cancel,
                terminate=lambda: _killpg(pid, signal.SIGTERM),
                kill=lambda: self._kill_tree(pid, slot, ticks, subreaper),
                term_grace_s=self.term_grace_s,
                exit_grace_s=self.exit_grace_s,
            )
            # A normal exit too: whatever the command left running dies with it.
            self._kill_tree(pid, slot, ticks, subreaper)
            status, rusage = _reap(proc)
        except BaseException:
            if proc is not None:
                self._kill_tree(proc.pid, slot, ticks, subreaper)
                _reap(proc)
            raise
        finally:
            if proc is not None:
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
            orphans.reap_zombies()

        return _result(
            req,
            exe,
            captured,
            pid=proc.pid,
            status=status,
            rusage=rusage,
            started=started,
            enforced=launch.enforced,
            oom_before=oom_before,
            slot=slot,
            disk=disk,
        )

    def _kill_tree(
        self, pid: int, slot: CgroupSlot | None, ticks: int | None, subreaper: bool
    ) -> None:
        """SIGKILL the group, then the cgroup (escapees), or else our re-parented orphans."""
        _killpg(pid, signal.SIGKILL)
        if slot is not None:
            if not slot.kill():
                log.warning("sandbox: cgroup %s is still not empty", slot.name)
        elif subreaper:
            orphans.kill_orphans(ticks, pid)


def sweep_stale(capabilities: Capabilities | None = None) -> list[str]:
    """Worker startup: kill and remove cgroups left by dead pool processes; returns names."""
    return _sweep(capabilities or detect_capabilities())


def is_best_effort(mechanism: str) -> bool:
    """Mechanisms that exist but can be escaped or may not hold: see sandbox-measurements.

    "none (...)" with a reason is a strong answer (no network, no capabilities); bare
    "none" is not, nor "unlimited (...)", "kept ...", "writable by ..." or "uid (...)".
    """
    weak_start = ("unlimited", "kept", "writable by", "uid (")
    weak = ("after-spawn", "(virtual", "(per-uid)")
    if mechanism in ("none", "killpg") or mechanism.startswith(weak_start):
        return True
    return any(w in mechanism for w in weak)


def _check_required(required: frozenset[str], enforced: dict[str, str]) -> None:
    for name in sorted(required):
        mechanism = enforced.get(name, "none")
        if is_best_effort(mechanism):
            raise IsolationUnavailable(
                f"limit {name!r} is required but this host only offers {mechanism!r}"
            )


def _noop(_pid: int) -> None:
    return None


def _check_request(req: ExecRequest) -> None:
    """Refuse what Popen would choke on (NUL bytes) and limits that make no sense."""
    for arg in req.argv:
        if "\x00" in arg:
            raise SandboxError("an argument contains a NUL byte")
    for key, value in req.env.items():
        if not key or "=" in key or "\x00" in key or "\x00" in value:
            raise SandboxError(f"invalid environment variable {key!r}")
    _check_limits(req.limits)


def _check_limits(limits: Limits) -> None:
    minimums: dict[str, float] = {
        "timeout_s": 1e-3,
        "cpu_s": 1,
        "memory_mb": 1,
        "processes": 1,
        "output_kb": 0,
        "file_mb": 0,
        "open_files": 1,
        "disk_mb": 1,
    }
    for name, low in minimums.items():
        if getattr(limits, name) < low:
            raise SandboxError(f"limit {name} must be >= {low}, got {getattr(limits, name)}")


def _child_env(req: ExecRequest, workdir: str) -> dict[str, str]:
    """Built from nothing: the worker's own environment (secrets included) never leaks."""
    env = {"PATH": SAFE_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": req.lang}
    for key, value in req.env.items():
        if key not in _FIXED_ENV:
            env[key] = value
    return env


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _reap(proc: subprocess.Popen[bytes]) -> tuple[int | None, resource.struct_rusage | None]:
    """wait4 the leader (bounded: a process stuck in D state must not hang the worker)."""
    deadline = time.monotonic() + _REAP_WAIT_S
    delay = 0.0005
    try:
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return status, rusage
            if time.monotonic() >= deadline:
                log.error("sandbox: pid %d did not exit after SIGKILL", proc.pid)
                return None, None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
    except ChildProcessError:
        return None, None
    finally:
        orphans.unregister(proc.pid)


def _result(
    req: ExecRequest,
    exe: str,
    captured: Captured,
    *,
    pid: int,
    status: int | None,
    rusage: resource.struct_rusage | None,
    started: float,
    enforced: dict[str, str],
    oom_before: int | None,
    slot: CgroupSlot | None,
    disk: PrivateDisk | None = None,
) -> ExecResult:
    exit_code: int | None = None
    sig: int | None = None
    if status is not None:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            exit_code = 128 + sig
        else:
            exit_code = os.WEXITSTATUS(status)
            if req.filesystem is not None and 128 < exit_code < 128 + signal.NSIG:
                # bubblewrap exits 128+N when the command died of signal N: report the
                # signal as for a command run directly (limit kills are told by it).
                sig = exit_code - 128
    cpu_s = None if rusage is None else float(rusage.ru_utime + rusage.ru_stime)
    # A limit signal names its limit even when a stop raced it (cpu_s == timeout_s, say).
    killed: str | None = None
    if sig == signal.SIGXCPU:
        killed = "cpu"
    elif sig == signal.SIGXFSZ:
        killed = "file_size"
    elif captured.stopped is not None:
        killed = captured.stopped
    elif slot is not None and oom_before is not None and (sig or exit_code):
        oom_after = slot.oom_kills()
        if oom_after is not None and oom_after > oom_before:
            killed = "memory"
    if killed is None and disk is not None and (sig or exit_code) and disk.full():
        killed = "disk"  # it failed with its private directory full (ENOSPC)
    if killed is None and sig == signal.SIGKILL and (cpu_s or 0) >= req.limits.cpu_s:
        killed = "cpu"  # SIGXCPU was ignored: the hard limit (cpu_s + 1) sent SIGKILL
    return ExecResult(
        exit_code=exit_code,
        signal=sig,
        stdout=captured.stdout.text(),
        stderr=captured.stderr.text(),
        stdout_bytes=captured.stdout.total,
        stderr_bytes=captured.stderr.total,
        stdout_truncated=captured.stdout.truncated,
        stderr_truncated=captured.stderr.truncated,
        killed=killed,
        duration_s=max(captured.ended_at - started, 0.0),
        enforced=enforced,
        pid=pid,
        executable=exe,
        cpu_s=cpu_s,
        peak_memory_bytes=None if slot is None else slot.peak_memory(),
    )
