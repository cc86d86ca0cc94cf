"""What this host can enforce, detected once per process (a few ms) and cached.

Nothing here runs at import time; a host without cgroups, wrappers or root still gets an answer
(with the reasons in `notes`), never an exception.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from dataclasses import dataclass

from producer.errors import ExecutableRefused

from .launcher import (
    CANNOT_DROP,
    LANDLOCK_SIGNAL_ABI,
    LAUNCHER,
    find_launcher,
    landlock_abi,
    launcher_candidates,
    launcher_filters_sockets,
    launcher_mounts,
)
from .resolve import resolve_executable

# LAUNCHER and launcher_candidates: where callers have always found them.
__all__ = [
    "LAUNCHER",
    "Capabilities",
    "detect_capabilities",
    "launcher_candidates",
    "own_dir",
    "set_subreaper",
]

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
_WRAPPER_DIRS = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")


@dataclass(frozen=True)
class Capabilities:
    """Mechanisms available here; cgroup fields are the directories we create children in."""

    euid: int
    prlimit: str | None
    setpriv: str | None
    pdeathsig: bool
    subreaper: bool
    memory_v1: str | None
    memsw: bool
    pids_v1: str | None
    cgroup_v2: str | None
    cgroup_kill: bool
    notes: tuple[str, ...] = ()
    # `unshare --net` for tenants without network (root only: a new network namespace).
    unshare: str | None = None
    # bubblewrap, when it is installed and could build a view here (see `bwrap_problem`).
    bwrap: str | None = None
    bwrap_problem: str | None = None
    # execq-launch (launch.c, built by `make install`): rlimits, identity and parent-death
    # signal in one exec instead of prlimit + setpriv.
    launcher: str | None = None
    # The launcher's `--no-sockets` seccomp filter installs here (a kernel with seccomp).
    socket_filter: bool = False
    # The launcher can give a command a mount namespace of its own with its private tmpfs
    # (`--mount`, the disk limit) and read-only kernel files (`--read-only`): root, Linux 5.2.
    private_mounts: bool = False
    # Landlock's ABI version (0: none); 6 and later scope signals (`--scope-signals`).
    landlock_abi: int = 0
    # CAP_SETPCAP: lets a command's securebits be locked and its bounding set emptied (a
    # container may drop it; no_new_privs then keeps every exec from gaining capabilities).
    setpcap: bool = False

    def can_isolate(
        self, *, run_as: bool, no_network: bool, filesystem: bool = False
    ) -> str | None:
        """Why this host cannot give a tenant the isolation it requires; None if it can."""
        if self.launcher is None and self.setpriv is None:
            return CANNOT_DROP
        if run_as and not ((self.setpriv or self.launcher) and self.is_root):
            return "running commands as the tenant's uids needs a root worker and setpriv"
        if no_network and not (self.unshare and self.is_root):
            return "commands without network need a root worker and unshare (util-linux)"
        if no_network and self.sockets_problem is not None:
            return self.sockets_problem
        if filesystem and self.bwrap is None:
            return f"a filesystem view needs bubblewrap: {self.bwrap_problem}"
        return None

    @property
    def sockets_problem(self) -> str | None:
        """Why commands without network could still reach the host's Unix sockets here (a
        network namespace does not hide them), or None when execq-launch refuses them."""
        if self.launcher is None:
            return (
                "commands without network need execq-launch (`make install` builds it with a "
                "C compiler) to refuse their sockets: a network namespace leaves the host's "
                "Unix sockets reachable"
            )
        if not self.socket_filter:
            return (
                f"commands without network need {self.launcher} --no-sockets, which failed "
                "here (a kernel without seccomp filters?): see the capability notes"
            )
        return None

    @property
    def mounts_privately(self) -> bool:
        """Each command in a mount namespace of its own: private tmpfs, read-only /sys."""
        return self.launcher is not None and self.private_mounts and self.is_root

    @property
    def scopes_signals(self) -> bool:
        """The launcher confines a command's signals and ptrace to its own tree (Landlock)."""
        return self.launcher is not None and self.landlock_abi >= LANDLOCK_SIGNAL_ABI

    @property
    def capabilities_label(self) -> str:
        """What a command keeps of the worker's capabilities: nothing, if a tool drops them."""
        if self.launcher is None and self.setpriv is None:
            return "kept (no execq-launch or setpriv)"
        if self.setpcap:
            return "none (bounding set empty, no_new_privs)"
        if not self.is_root:
            return "none (no_new_privs)"
        if self.launcher is None:
            # setpriv cannot empty a uid-0 command's permitted set: its exec refills it.
            return f"kept by uid-0 commands ({ROOT_NEEDS_LAUNCHER})"
        return f"none (no_new_privs; {KEPT_BOUNDING})"

    @property
    def disk_label(self) -> str:
        """How the disk limit holds on this host, for commands without a filesystem view."""
        if self.mounts_privately:
            return "tmpfs (own mount namespace)"
        return f"unlimited ({self.disk_problem})"

    @property
    def disk_problem(self) -> str:
        """Why commands without a filesystem view get no disk limit here."""
        if not self.is_root:
            return "a mount namespace needs a root worker"
        if self.launcher is None:
            return "needs execq-launch"
        return "execq-launch --mount failed here: see the capability notes"

    @property
    def kernel_files_label(self) -> str:
        """Whether a uid-0 command may write /sys (cgroups included) and /proc/sys."""
        if self.mounts_privately:
            return "read-only (own mount namespace)"
        if self.is_root:
            return "writable by uid 0 (no mount namespace)"
        return "not writable (commands are not root)"

    @property
    def signals_label(self) -> str:
        """Whom a command may signal or ptrace: its own tree, or whatever its uid allows."""
        if self.scopes_signals:
            return "landlock (own process tree only)"
        return "uid (kernel checks only)"

    @property
    def is_root(self) -> bool:
        """Root ignores RLIMIT_NPROC, so processes need the pids cgroup there."""
        return self.euid == 0

    def mechanisms(self) -> dict[str, str]:
        """Limit name -> how a run on this host enforces it (the per-run `enforced` default)."""
        return {
            "time": "wall-clock loop",
            "cpu": self.rlimit_label,
            "memory": "cgroup-v1" if self.memory_v1 else f"{self.rlimit_label}-as (virtual, 4x)",
            "processes": self.processes_label,
            "file_size": self.rlimit_label,
            "open_files": self.rlimit_label,
            "core": self.rlimit_label,
            "kill": self.kill_label(v2=self.cgroup_kill, v1=bool(self.memory_v1 or self.pids_v1)),
            "parent_death": (
                "launcher-pdeathsig"
                if self.launcher
                else "setpriv-pdeathsig"
                if self.pdeathsig
                else "none"
            ),
            "output": "head+tail",
            "capabilities": self.capabilities_label,
            "disk": self.disk_label,
            "kernel_files": self.kernel_files_label,
            "signals": self.signals_label,
        }

    @property
    def rlimit_label(self) -> str:
        """`rlimit` through the prlimit wrapper; set after spawn (racy) without it."""
        return "rlimit" if self.prlimit or self.launcher else "rlimit-after-spawn"

    @property
    def processes_label(self) -> str:
        """pids cgroup, else RLIMIT_NPROC (per uid, and ignored for root), else nothing."""
        if self.pids_v1:
            return "cgroup-v1-pids"
        return "none" if self.is_root else f"{self.rlimit_label}-nproc (per-uid)"

    def kill_label(self, *, v2: bool, v1: bool) -> str:
        """How a process tree is killed: the group, then the cgroup, then re-parented orphans."""
        parts = ["killpg"]
        if v2:
            parts.append("cgroup.kill")
        elif v1:
            parts.append("cgroup-procs")
        if self.subreaper:
            parts.append("subreaper")
        return "+".join(parts)

    def summary(self) -> str:
        """One line for the worker's startup log, e.g. `time=wall-clock-loop cpu=rlimit ...`."""
        items = [f"{k}={v.split(' ')[0]}" for k, v in self.mechanisms().items()]
        return " ".join(items)


@functools.cache
def detect_capabilities() -> Capabilities:
    """Probe the host once per process; `detect_capabilities.cache_clear()` forces a re-probe."""
    notes: list[str] = []
    prlimit = _find_wrapper("prlimit", notes)
    setpriv = _find_wrapper("setpriv", notes)
    pdeathsig = setpriv is not None and _setpriv_pdeathsig_works(setpriv, notes)
    subreaper = _subreaper_available(notes)
    mounts = _cgroup_mounts()
    own = _own_cgroups()
    memory_dir = _probe_v1("memory", mounts, own, "memory.limit_in_bytes", notes)
    memsw = memory_dir is not None and os.path.exists(
        os.path.join(memory_dir, "memory.memsw.limit_in_bytes")
    )
    pids_dir = _probe_v1("pids", mounts, own, "pids.max", notes)
    v2_dir, v2_kill = _probe_v2(mounts, own, notes)
    bwrap, bwrap_problem = _probe_bwrap(notes)
    launcher = find_launcher(notes)
    socket_filter = launcher is not None and launcher_filters_sockets(launcher, notes)
    private = launcher is not None and os.geteuid() == 0 and launcher_mounts(launcher, notes)
    return Capabilities(
        euid=os.geteuid(),
        prlimit=prlimit,
        setpriv=setpriv,
        pdeathsig=pdeathsig,
        subreaper=subreaper,
        memory_v1=memory_dir,
        memsw=memsw,
        pids_v1=pids_dir,
        cgroup_v2=v2_dir,
        cgroup_kill=v2_kill,
        notes=tuple(notes),
        unshare=shutil.which("unshare"),
        bwrap=bwrap,
        bwrap_problem=bwrap_problem,
        launcher=launcher,
        socket_filter=socket_filter,
        private_mounts=private,
        landlock_abi=landlock_abi(),
        setpcap=_has_effective(CAP_SETPCAP),
    )


CAP_SETPCAP = 8
KEPT_BOUNDING = "bounding set kept: the worker lacks CAP_SETPCAP"
ROOT_NEEDS_LAUNCHER = "setpriv without CAP_SETPCAP cannot drop them: needs execq-launch"


def _has_effective(cap: int) -> bool:
    """Whether this process holds `cap` in its effective set (/proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        pass
    return False


def _probe_bwrap(notes: list[str]) -> tuple[str | None, str | None]:
    """(path, None) if bubblewrap can build a view here (it needs root or user namespaces),
    else (None, why not)."""
    path = _find_wrapper("bwrap", [])
    if path is None:
        return None, "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    probe = [path, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid"]
    probe += ["--die-with-parent", "--tmpfs", "/tmp", "--", "/bin/true"]  # noqa: S108 (inside the view)
    try:
        done = subprocess.run(probe, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = f"{path} could not run: {exc}"
    else:
        if done.returncode == 0:
            return path, None
        err = done.stderr.decode(errors="replace").strip().splitlines()
        reason = err[-1] if err else f"exit code {done.returncode}"
        problem = f"{path} cannot build a view here ({reason}): it needs root or user namespaces"
    notes.append(problem)
    return None, problem


def _find_wrapper(name: str, notes: list[str]) -> str | None:
    """A wrapper must pass the same safety checks as a command: it runs before every command."""
    for d in _WRAPPER_DIRS:
        path = os.path.join(d, name)
        if os.path.exists(path):
            try:
                return resolve_executable(path, [path])
            except ExecutableRefused as exc:
                notes.append(f"{name}: {exc}")
                return None
    notes.append(f"{name}: not found in {', '.join(_WRAPPER_DIRS)}")
    return None


def _setpriv_pdeathsig_works(setpriv: str, notes: list[str]) -> bool:
    """util-linux before 2.33 has no --pdeathsig; run it once rather than parse versions."""
    try:
        rc = subprocess.run(
            [setpriv, "--pdeathsig", "KILL", "--", setpriv, "--version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={},
            timeout=5,
            check=False,
        ).returncode
    except (OSError, subprocess.SubprocessError) as exc:
        notes.append(f"setpriv --pdeathsig: {exc}")
        return False
    if rc != 0:
        notes.append(f"setpriv --pdeathsig: exit status {rc}")
    return rc == 0


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _subreaper_available(notes: list[str]) -> bool:
    """Ask for the current value: it fails the same way setting it would on old kernels."""
    libc = _libc()
    if libc is None:
        notes.append("subreaper: no libc")
        return False
    value = ctypes.c_int(0)
    if libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0) != 0:
        notes.append(f"subreaper: prctl failed: {os.strerror(ctypes.get_errno())}")
        return False
    return True


def set_subreaper() -> bool:
    """Make this process adopt its descendants' orphans (not inherited across fork)."""
    libc = _libc()
    return libc is not None and libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _cgroup_mounts() -> dict[str, tuple[str, str]]:
    """Controller (or `unified`) -> (mount point, root of the mount inside the hierarchy)."""
    out: dict[str, tuple[str, str]] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        pre, _, post = line.partition(" - ")
        pre_f, post_f = pre.split(), post.split()
        if len(pre_f) < 5 or len(post_f) < 3:
            continue
        root, mount_point, fstype = pre_f[3], pre_f[4], post_f[0]
        if fstype == "cgroup2":
            out.setdefault("unified", (mount_point, root))
        elif fstype == "cgroup":
            for opt in post_f[2].split(","):
                out.setdefault(opt, (mount_point, root))
    return out


def _own_cgroups() -> dict[str, str]:
    """Controller (or `unified`) -> our path inside that hierarchy, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if parts[0] == "0" and not controllers:
            out["unified"] = path
        for c in controllers.split(","):
            if c:
                out[c] = path
    return out


def own_dir(key: str, mounts: dict[str, tuple[str, str]], own: dict[str, str]) -> str | None:
    """The directory of our own cgroup in one hierarchy, or None if it is not mounted."""
    if key not in mounts or key not in own:
        return None
    mount_point, root = mounts[key]
    path = own[key]
    # Inside a container the mount root is our own cgroup, so strip it from the path.
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    return os.path.normpath(mount_point + "/" + path.lstrip("/"))


def _probe(directory: str, needed: str, notes: list[str], label: str) -> bool:
    """mkdir + rmdir a child: the only honest test that we may create cgroups here."""
    probe = os.path.join(directory, f"execq-probe-{os.getpid()}")
    try:
        os.mkdir(probe)
    except FileExistsError:
        pass
    except OSError as exc:
        notes.append(f"{label}: cannot create a cgroup under {directory}: {exc.strerror}")
        return False
    try:
        ok = os.path.exists(os.path.join(probe, needed))
        if not ok:
            notes.append(f"{label}: {needed} missing under {directory}")
        return ok
    finally:
        try:
            os.rmdir(probe)
        except OSError as exc:
            notes.append(f"{label}: cannot remove probe {probe}: {exc.strerror}")


def _probe_v1(
    controller: str,
    mounts: dict[str, tuple[str, str]],
    own: dict[str, str],
    needed: str,
    notes: list[str],
) -> str | None:
    label = f"cgroup-v1 {controller}"
    directory = own_dir(controller, mounts, own)
    if directory is None:
        notes.append(f"{label}: not mounted")
        return None
    return directory if _probe(directory, needed, notes, label) else None


def _probe_v2(
    mounts: dict[str, tuple[str, str]], own: dict[str, str], notes: list[str]
) -> tuple[str | None, bool]:
    directory = own_dir("unified", mounts, own)
    if directory is None:
        notes.append("cgroup-v2: not mounted")
        return None, False
    if not _probe(directory, "cgroup.kill", notes, "cgroup-v2"):
        return None, False
    return directory, True
