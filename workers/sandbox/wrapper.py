"""The wrapper chain that applies per-command limits without running Python in the child.

`execq-launch` (launch.c: rlimits, private mounts, identity, capability drop, parent-death
signal) then the command: one extra exec. Without it (not built), `prlimit` then `setpriv`:
two, 1.2 ms more per command. Either way not preexec_fn, which forces fork() and costs
~10 ms in a 300 MB pool process. A namespace wrapper (unshare, bwrap) goes between the
limits and the identity switch; the step after it drops the capabilities it needed.
Without network, the launcher after it also refuses every socket (seccomp): a network
namespace alone leaves the host's Unix sockets reachable.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass

from producer.errors import SandboxError

from .capabilities import KEPT_BOUNDING, ROOT_NEEDS_LAUNCHER, Capabilities
from .launcher import CANNOT_DROP, kernel_files
from .model import FsView, Limits
from .procfs import count_tasks_of_uid

MiB = 1024 * 1024
NO_NETWORK = "none (network namespace, sockets refused by seccomp)"
# setpriv's spelling of what execq-launch locks: no capabilities back through any exec.
SECUREBITS = "+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked,+keep_caps_locked"


@dataclass(frozen=True)
class Launch:
    """The argv to spawn, the limits it enforces (name -> mechanism), and rlimits left to set."""

    argv: tuple[str, ...]
    enforced: dict[str, str]
    after_spawn: tuple[tuple[int, int, int], ...] = ()  # (resource, soft, hard) without prlimit


def fallback_address_space_mb(memory_mb: int) -> int:
    """RLIMIT_AS counts reserved, not used, memory: only a generous ceiling is safe."""
    return max(4 * memory_mb, memory_mb + 1024)


def build_launch(
    exe: str,
    args: Sequence[str],
    limits: Limits,
    caps: Capabilities,
    *,
    memory_cgroup: bool,
    pids_cgroup: bool,
    kill: str,
    run_as: tuple[int, int] | None = None,
    network: bool = True,
    filesystem: FsView | None = None,
    workdir: str = "",
    disk_fd: int | None = None,
) -> Launch:
    """Compose launcher (or prlimit) -> [unshare | bwrap] -> [launcher | setpriv] -> exe and
    say what each relies on.

    `run_as`: the last step also switches to that uid/gid with no supplementary groups. It
    drops every capability (uid 0 included) and sets no_new_privs, then the parent-death
    signal, which the switch would otherwise clear. `disk_fd`: the command's private tmpfs
    (disk.private_disk), which the first launcher attaches on `workdir` in a mount namespace
    of its own, where the kernel's files are read-only too.
    """
    rl: list[tuple[str, int, int, int]] = [
        ("cpu", resource.RLIMIT_CPU, limits.cpu_s, limits.cpu_s + 1),
        ("fsize", resource.RLIMIT_FSIZE, limits.file_mb * MiB, limits.file_mb * MiB),
        ("nofile", resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        ("core", resource.RLIMIT_CORE, 0, 0),
    ]
    enforced = caps.mechanisms()
    enforced["kill"] = kill
    rlimit = caps.rlimit_label
    if memory_cgroup:
        enforced["memory"] = "cgroup-v1"
    else:
        as_bytes = fallback_address_space_mb(limits.memory_mb) * MiB
        rl.append(("as", resource.RLIMIT_AS, as_bytes, as_bytes))
        enforced["memory"] = f"{rlimit}-as (virtual, 4x)"
    if pids_cgroup:
        enforced["processes"] = "cgroup-v1-pids"
    elif not caps.is_root:
        # RLIMIT_NPROC counts every task of the uid (the worker's included), so add those.
        nproc = limits.processes + count_tasks_of_uid(caps.euid)
        rl.append(("nproc", resource.RLIMIT_NPROC, nproc, nproc))
        enforced["processes"] = f"{rlimit}-nproc (per-uid)"
    else:
        enforced["processes"] = "none"
    if caps.launcher is None and caps.setpriv is None:
        raise SandboxError(CANNOT_DROP)

    chain: list[str] = []
    after: tuple[tuple[int, int, int], ...] = ()
    if caps.launcher:
        chain.append(caps.launcher)
        for name, _, soft, hard in rl:
            chain += ["--rlimit", f"{name}={soft}:{hard}"]
        chain += _private_mounts(caps, enforced, limits, disk_fd, workdir, filesystem, run_as)
    elif caps.prlimit:
        chain.append(caps.prlimit)
        for name, _, soft, hard in rl:
            chain.append(f"--{name}={soft}:{hard}")
        chain.append("--")
    else:
        after = tuple((res, soft, hard) for _, res, soft, hard in rl)
    if disk_fd is None and caps.mounts_privately:
        enforced["disk"] = "unlimited (no private tmpfs for this run)"
    elif disk_fd is None:
        enforced["disk"] = caps.disk_label
    namespaces: list[str] = []
    if filesystem is not None:
        # Without the launcher's tmpfs, bubblewrap's own (root's: not for a run_as uid).
        own_disk = disk_fd is None and run_as is None
        namespaces = bwrap_args(
            caps, filesystem, workdir, network=network, disk_mb=limits.disk_mb if own_disk else None
        )
        enforced["filesystem"] = (
            f"bubblewrap (read-only root, private /tmp {filesystem.tmp_mb} MB, no /run)"
        )
        enforced["kernel_files"] = "read-only (bubblewrap)"
        if own_disk and workdir:
            enforced["disk"] = f"tmpfs {limits.disk_mb} MB (bubblewrap)"
    elif not network:
        if not (caps.unshare and caps.is_root):
            raise SandboxError("a command without network needs a root worker and unshare")
        namespaces = [caps.unshare, "--net", "--"]
    if not network:
        if caps.sockets_problem is not None:
            raise SandboxError(caps.sockets_problem)
        enforced["network"] = NO_NETWORK
    if caps.launcher is None and caps.is_root and not caps.setpcap:
        if run_as is None:
            raise SandboxError(
                f"a command run as root would keep capabilities: {ROOT_NEEDS_LAUNCHER}"
            )
        enforced["capabilities"] = f"none (uid switch, no_new_privs; {KEPT_BOUNDING})"
    if run_as is not None:
        enforced["identity"] = f"uid {run_as[0]} gid {run_as[1]}"
        if filesystem is None:
            enforced["kernel_files"] = f"not writable (uid {run_as[0]})"
    if caps.launcher and not namespaces:
        # One exec does it all: mounts, identity, capabilities, then the parent-death signal.
        chain += _identity(caps.launcher, run_as, caps, launcher=True, no_sockets=not network)
    else:
        if caps.launcher:
            # unshare and bubblewrap need the capabilities: the step after them drops them.
            chain += ["--keep-caps", "--"]
        chain += namespaces
        step = caps.launcher or caps.setpriv
        assert step is not None  # refused above
        launcher = step == caps.launcher
        chain += [step, *_identity(step, run_as, caps, launcher=launcher, no_sockets=not network)]
    return Launch(argv=(*chain, exe, *args), enforced=enforced, after_spawn=after)


def _private_mounts(
    caps: Capabilities,
    enforced: dict[str, str],
    limits: Limits,
    disk_fd: int | None,
    workdir: str,
    filesystem: FsView | None,
    run_as: tuple[int, int] | None,
) -> list[str]:
    """The first launcher's `--mount` (the disk limit) and `--read-only` arguments.

    The kernel's files are made read-only for uid 0 only: they are root's, so its owner
    bits let a command without capabilities write them (its cgroups, sysctls); to any other
    uid they are read-only already. bubblewrap's read-only root covers them in a view.
    """
    if not caps.mounts_privately:
        return []
    out: list[str] = []
    if disk_fd is not None:
        if not workdir:
            raise SandboxError("a private tmpfs needs the run's private directory")
        out += ["--mount", f"{disk_fd}:{workdir}"]
        enforced["disk"] = f"tmpfs {limits.disk_mb} MB (own mount namespace)"
    if filesystem is None and run_as is None:
        for path in kernel_files():
            out += ["--read-only", path]
    return out


def bwrap_args(
    caps: Capabilities,
    view: FsView,
    workdir: str,
    *,
    network: bool,
    disk_mb: int | None = None,
) -> list[str]:
    """bubblewrap's arguments: the host read-only, the command's own directories writable.

    The workdir's siblings (other commands' directories) are under an empty tmpfs; /run
    (daemons' sockets) too. `disk_mb`: the workdir itself a tmpfs of that size, root's
    (when the launcher has not already mounted one there). `--new-session` is left out on
    purpose: it would move the command out of the process group the executor kills. A
    signal that kills the command shows as exit code 128+N (bubblewrap's own exit status).
    """
    if caps.bwrap is None:
        raise SandboxError(f"a filesystem view needs bubblewrap: {caps.bwrap_problem}")
    args = [caps.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    # bubblewrap covers /proc/irq, /proc/bus and sysrq-trigger, but not /proc/sys (its mode
    # says read-only, its files are root's 0644): a uid-0 command could set sysctls.
    args += ["--ro-bind", "/proc/sys", "/proc/sys"]
    args += ["--unshare-pid", "--unshare-ipc", "--die-with-parent"]
    if not network:
        args.append("--unshare-net")
    # The command's own /tmp inside the view, not the host's.
    args += ["--perms", "1777", "--size", str(view.tmp_mb * MiB), "--tmpfs", "/tmp"]  # noqa: S108
    args += ["--tmpfs", "/run"]
    if workdir:
        args += ["--tmpfs", os.path.dirname(workdir)]
        if disk_mb is not None:
            args += ["--perms", "0700", "--size", str(disk_mb * MiB), "--tmpfs", workdir]
        else:
            args += ["--bind", workdir, workdir]
    for path in view.writable:
        if not os.path.isdir(path):
            raise SandboxError(f"writable directory {path} does not exist on this host")
        args += ["--bind", path, path]
    # Last, so that no writable directory bound above brings a hidden path back.
    for path in view.hidden:
        # Nothing to hide where nothing is; bubblewrap could not mount over it anyway.
        if os.path.isdir(path):
            args += ["--tmpfs", path]
        elif os.path.exists(path):
            args += ["--ro-bind", "/dev/null", path]
    if caps.launcher:
        # The identity step after bwrap is the launcher, wherever it is installed (a checkout
        # under /tmp would be under the private /tmp): make it visible, read-only.
        args += ["--ro-bind", caps.launcher, caps.launcher]
    if workdir:
        args += ["--chdir", workdir]
    args.append("--")
    return args


def _identity(
    program: str,
    run_as: tuple[int, int] | None,
    caps: Capabilities,
    *,
    launcher: bool,
    no_sockets: bool = False,
) -> list[str]:
    """Arguments of `program` (execq-launch or setpriv), ending with `--`: the identity, every
    capability dropped with no_new_privs, the parent-death signal and (launcher only) the
    signal scope and the socket filter."""
    if run_as is not None and not caps.is_root:
        raise SandboxError(f"running as uid {run_as[0]} needs a root worker")
    uid, gid = run_as if run_as is not None else (None, None)
    if launcher:
        args = [] if uid is None else ["--uid", str(uid), "--gid", str(gid)]
        args.append("--pdeathsig")
        if caps.scopes_signals:
            args.append("--scope-signals")
        # The filter goes on the last step only: bubblewrap needs a netlink socket to bring
        # up the namespace's loopback, and it would inherit a filter set before it.
        if no_sockets:
            args.append("--no-sockets")
        return [*args, "--"]
    if no_sockets:
        raise SandboxError("only execq-launch can refuse a command's sockets")
    args = []
    if uid is not None:
        args += [f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    args += ["--inh-caps=-all", "--ambient-caps=-all"]
    if caps.setpcap:
        args += ["--bounding-set=-all", f"--securebits={SECUREBITS}"]
    args.append("--no-new-privs")
    if caps.pdeathsig:
        args += ["--pdeathsig", "KILL"]
    return [*args, "--"]


def apply_after_spawn(pid: int, rlimits: Sequence[tuple[int, int, int]]) -> None:
    """Fallback without prlimit: racy (the command already runs), so best effort only."""
    for res, soft, hard in rlimits:
        with contextlib.suppress(OSError, ValueError):
            resource.prlimit(pid, res, (soft, hard))
