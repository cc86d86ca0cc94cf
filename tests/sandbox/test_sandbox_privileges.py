"""A command run as root (a tenant without run_as) keeps none of the worker's privileges: no
capability in any set, no_new_privs, no way back through an exec; its cgroups and the
kernel's knobs are read-only to it, and it cannot signal, trace or mount anything."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.errors import SandboxError
from workers.sandbox import Sandbox
from workers.sandbox.model import FsView
from workers.sandbox.wrapper import build_launch

from .helpers import ATTEMPT, CAPS, LIMITS, PY, python

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a root worker is what this is about")
needs_launcher = pytest.mark.skipif(CAPS.launcher is None, reason="execq-launch is not built")
NO_CAPS = "none (bounding set empty, no_new_privs)"
ZERO = "0000000000000000"

STATUS = """
import json
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines())
keys = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Uid")
print(json.dumps({k: status[k].split()[0] if k == "Uid" else status[k] for k in keys}))
"""


# Writes its pid to each file named, then rewrites a sysctl with its own value.
MOVE_OUT = """
import json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        out[path] = "ok"
    except OSError as exc:
        out[path] = exc.errno
out["cgroup"] = open("/proc/self/cgroup").read()
try:  # a sysctl, rewritten with its own value: nothing changes if it is allowed
    with open("/proc/sys/kernel/domainname", "r+") as f:
        value = f.read()
        f.seek(0)
        f.write(value)
    out["sysctl"] = "ok"
except OSError as exc:
    out["sysctl"] = exc.errno
print(json.dumps(out))
"""


def _status(stdout: str) -> dict[str, str]:
    return dict(json.loads(stdout))


def _assert_no_privileges(seen: dict[str, str], uid: str = "0") -> None:
    caps = {k: seen[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    assert caps == dict.fromkeys(caps, ZERO), seen
    assert (seen["NoNewPrivs"], seen["Uid"]) == ("1", uid), seen


def test_a_root_run_command_has_no_capability_and_no_new_privileges(sandbox: Sandbox) -> None:
    r = sandbox.run(python(STATUS))
    assert r.exit_code == 0, r.stderr
    _assert_no_privileges(_status(r.stdout))
    assert r.enforced["capabilities"] == NO_CAPS


@pytest.fixture
def setuid_cat() -> Iterator[str]:
    """A setuid-root copy of cat, where any uid can run it (not under pytest's 0700 tmp)."""
    where = tempfile.mkdtemp(prefix="execq-suid-")
    try:
        os.chmod(where, 0o755)
        path = os.path.join(where, "cat")
        shutil.copy("/bin/cat", path)
        os.chmod(path, 0o4755)
        yield path
    finally:
        shutil.rmtree(where)


def test_no_exec_gives_a_capability_back_not_even_of_a_setuid_root_program(
    sandbox: Sandbox, setuid_cat: str
) -> None:
    code = "import os, sys\nos.execv(sys.argv[1], [sys.argv[1], '/proc/self/status'])"
    for run_as, uid in ((None, "0"), ((41710, 41710), "41710")):
        req = dataclasses.replace(python(code, setuid_cat), run_as=run_as)
        r = sandbox.run(req)
        assert r.exit_code == 0, r.stderr
        status = dict(line.split(":\t", 1) for line in r.stdout.splitlines())
        seen = {k: v.split()[0] if k == "Uid" else v for k, v in status.items()}
        # Uid's first field is the real uid; the effective one (second) did not become 0.
        assert status["Uid"].split()[1] == uid
        _assert_no_privileges(seen, uid)


@needs_launcher
def test_without_cap_setpcap_no_exec_regains_a_capability_all_the_same(setuid_cat: str) -> None:
    # A container that dropped CAP_SETPCAP: the launcher can neither lock the securebits nor
    # empty the bounding set; no_new_privs with empty sets keeps every exec empty anyway.
    assert CAPS.launcher is not None and CAPS.setpriv is not None
    code = "import os, sys\nos.execv(sys.argv[1], [sys.argv[1], '/proc/self/status'])"
    done = subprocess.run(
        [CAPS.setpriv, "--bounding-set=-setpcap", "--", CAPS.launcher, "--", PY, "-c", code,
         setuid_cat],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    status = dict(line.split(":\t", 1) for line in done.stdout.splitlines())
    for key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert status[key] == ZERO, status
    assert status["CapBnd"] != ZERO and status["NoNewPrivs"] == "1"
    label = dataclasses.replace(CAPS, setpcap=False).capabilities_label
    assert label == "none (no_new_privs; bounding set kept: the worker lacks CAP_SETPCAP)"


def test_with_setpriv_alone_and_no_cap_setpcap_a_root_run_command_is_refused(
    tmp_path: Path,
) -> None:
    # setpriv can empty the inheritable and ambient sets, not the permitted one: a uid-0
    # exec would refill it from the bounding set, which only CAP_SETPCAP can empty.
    caps = dataclasses.replace(CAPS, launcher=None, setpcap=False)
    assert caps.capabilities_label.startswith("kept by uid-0 commands")
    with Sandbox(workdir_root=tmp_path / "runs", capabilities=caps) as sb:
        with pytest.raises(SandboxError, match="needs execq-launch"):
            sb.run(python(STATUS))
        # A uid switch empties the permitted set itself: run_as tenants still run.
        r = sb.run(dataclasses.replace(python(STATUS), run_as=(41711, 41711)))
    assert r.exit_code == 0, r.stderr
    seen = _status(r.stdout)
    assert seen["CapPrm"] == seen["CapEff"] == seen["CapAmb"] == ZERO
    assert (seen["NoNewPrivs"], seen["Uid"]) == ("1", "41711")
    assert r.enforced["capabilities"].startswith("none (uid switch, no_new_privs")


def test_inside_a_filesystem_view_the_command_drops_what_bubblewrap_kept(
    sandbox: Sandbox,
) -> None:
    if CAPS.bwrap is None:
        pytest.skip(f"no bubblewrap: {CAPS.bwrap_problem}")
    view = FsView(tmp_mb=8)
    r = sandbox.run(dataclasses.replace(python(STATUS), filesystem=view))
    assert r.exit_code == 0, r.stderr
    _assert_no_privileges(_status(r.stdout))
    assert r.enforced["kernel_files"] == "read-only (bubblewrap)"
    # bubblewrap leaves /proc/sys alone (it looks read-only): execq binds it read-only.
    seen = json.loads(sandbox.run(dataclasses.replace(python(MOVE_OUT), filesystem=view)).stdout)
    assert seen["sysctl"] == errno.EROFS


@needs_launcher
def test_without_network_the_last_launcher_step_drops_them_after_unshare(tmp_path: Path) -> None:
    if CAPS.unshare is None:
        pytest.skip("needs unshare")
    built = build_launch(
        PY, [], LIMITS, CAPS, memory_cgroup=True, pids_cgroup=True, kill="killpg", network=False
    )
    argv = list(built.argv)
    # The first launcher keeps them for unshare; the one after it drops them.
    assert argv.count("--keep-caps") == 1
    assert argv.index("--keep-caps") < argv.index(CAPS.unshare) < argv.index("--no-sockets")
    with Sandbox(workdir_root=tmp_path / "runs", capabilities=CAPS) as sb:
        r = sb.run(dataclasses.replace(python(STATUS), network=False))
    assert r.exit_code == 0, r.stderr
    _assert_no_privileges(_status(r.stdout))


# --- its cgroups ------------------------------------------------------------------------


def _cgroup_mounts() -> dict[str, str]:
    """Controller (or `unified`) -> mount point, from our mountinfo."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fstype, options = post.split()[0], post.split()[2]
        if fstype == "cgroup2":
            out.setdefault("unified", pre.split()[4])
        elif fstype == "cgroup":
            for opt in options.split(","):
                out.setdefault(opt, pre.split()[4])
    return out


@pytest.fixture
def other_cgroup() -> Iterator[str]:
    """A pids cgroup of the test's own, beside the worker's: somewhere to escape to."""
    if CAPS.pids_v1 is None:
        pytest.skip("needs a writable cgroup-v1 pids hierarchy")
    path = os.path.join(CAPS.pids_v1, f"sbx-other-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    finally:
        for pid in Path(path, "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), 9)
        for _ in range(100):
            try:
                os.rmdir(path)
                break
            except OSError:
                subprocess.run(["/bin/sleep", "0.02"], check=False)


def _own_limit_files(cgroup: str, mounts: dict[str, str]) -> list[str]:
    """The command's own pids.max and memory limit, from its /proc/self/cgroup."""
    files = []
    for line in cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            files.append(f"{mounts['pids']}{path}/pids.max")
        if "memory" in controllers.split(","):
            files.append(f"{mounts['memory']}{path}/memory.limit_in_bytes")
    return files


@needs_launcher
def test_a_root_run_command_cannot_leave_its_cgroup_nor_raise_its_limits(
    tmp_path: Path, other_cgroup: str
) -> None:
    assert CAPS.mounts_privately, CAPS.notes
    mounts = _cgroup_mounts()
    targets = [f"{other_cgroup}/cgroup.procs"]
    for parent in (CAPS.memory_v1, CAPS.pids_v1, CAPS.cgroup_v2):  # the worker's own cgroups
        if parent:
            targets.append(f"{parent}/cgroup.procs")
    for key in ("memory", "pids", "unified"):  # the roots of the hierarchies
        if key in mounts:
            targets.append(f"{mounts[key]}/cgroup.procs")
    with Sandbox(workdir_root=tmp_path / "runs", capabilities=CAPS) as sb:
        cgroup = sb.run(python("print(open('/proc/self/cgroup').read(), end='')")).stdout
        targets += _own_limit_files(cgroup, mounts)
        r = sb.run(python(MOVE_OUT, *targets))
    assert r.exit_code == 0, r.stderr
    seen = json.loads(r.stdout)
    assert {t: seen[t] for t in targets} == dict.fromkeys(targets, errno.EROFS)
    assert seen["sysctl"] == errno.EROFS
    assert "/execq-" in seen["cgroup"] and "sbx-other" not in seen["cgroup"]
    assert r.enforced["kernel_files"] == "read-only (own mount namespace)"
    assert Path(f"{other_cgroup}/cgroup.procs").read_text() == ""


def test_without_execq_launch_uid_0_can_still_move_itself_as_the_record_says(
    tmp_path: Path, other_cgroup: str
) -> None:
    # No mount namespace here: the cgroup files are root's, and uid 0 owns them even without
    # a capability. What holds is what the record says (a run_as tenant is the remedy).
    caps = dataclasses.replace(CAPS, launcher=None)
    with Sandbox(workdir_root=tmp_path / "runs", capabilities=caps) as sb:
        r = sb.run(python(MOVE_OUT, f"{other_cgroup}/cgroup.procs"))
    assert r.exit_code == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen[f"{other_cgroup}/cgroup.procs"] == seen["sysctl"] == "ok"
    assert r.enforced["kernel_files"] == "writable by uid 0 (no mount namespace)"
    assert r.enforced["capabilities"] == NO_CAPS


# --- other processes, mounts -----------------------------------------------------------

REACH_OTHERS = (
    ATTEMPT
    + """
import ctypes, json, os, signal, subprocess, sys
target = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def ptrace():
    if libc.ptrace(16, target, 0, 0) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
    libc.ptrace(17, target, 0, 0)  # PTRACE_DETACH
child = subprocess.Popen(["/bin/sleep", "30"])
attempt("kill", lambda: os.kill(target, 0))  # 0: the permission check, no harm done
attempt("kill_worker", lambda: os.kill(os.getppid(), 0))
attempt("ptrace", ptrace)
attempt("environ", lambda: open(f"/proc/{target}/environ", "rb").read())
attempt("own_child", lambda: os.kill(child.pid, signal.SIGKILL))
child.wait()
print(json.dumps(out))
"""
)


@pytest.fixture
def root_sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A root process outside any command's tree, with every capability."""
    proc = subprocess.Popen(["/bin/sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_root_run_command_cannot_signal_or_trace_a_root_process_outside_its_tree(
    sandbox: Sandbox, root_sleeper: subprocess.Popen[bytes]
) -> None:
    r = sandbox.run(python(REACH_OTHERS, str(root_sleeper.pid)))
    assert r.exit_code == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["own_child"] == "ok"
    # Without capabilities: reading another root process's memory or environment needs its
    # capabilities to be a subset of ours.
    assert seen["ptrace"] == errno.EPERM
    assert seen["environ"] == errno.EACCES
    if sandbox.capabilities.scopes_signals:
        assert seen["kill"] == seen["kill_worker"] == errno.EPERM
        assert r.enforced["signals"] == "landlock (own process tree only)"
    else:
        # Signals are checked by uid alone: uid 0 reaches every root process. Said so.
        assert seen["kill"] == "ok"
        assert r.enforced["signals"] == "uid (kernel checks only)"
    assert root_sleeper.poll() is None


MOUNT = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def call(name, result):
    out[name] = "ok" if result == 0 else ctypes.get_errno()
call("mount", libc.mount(b"none", os.getcwd().encode(), b"tmpfs", 0, None))
call("umount", libc.umount2(b"/sys", 2))
call("unshare_mounts", libc.unshare(0x00020000))
call("setuid", libc.setuid(1))
open("mine", "w").close()
call("chown", libc.chown(b"mine", 1, 1))
print(json.dumps(out))
"""


def test_a_root_run_command_cannot_mount_change_uid_or_give_files_away(sandbox: Sandbox) -> None:
    r = sandbox.run(python(MOUNT))
    assert r.exit_code == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen == dict.fromkeys(seen, errno.EPERM), seen


# --- the launcher on its own ------------------------------------------------------------


@needs_launcher
def test_the_launcher_keeps_capabilities_only_when_told_to() -> None:
    assert CAPS.launcher is not None
    for extra, expected in (([], ZERO), (["--keep-caps"], None)):
        done = subprocess.run(
            [CAPS.launcher, *extra, "--", PY, "-c", STATUS],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        seen = _status(done.stdout)
        if expected is None:
            assert seen["CapEff"] != ZERO and seen["NoNewPrivs"] == "0"
        else:
            _assert_no_privileges(seen)


@needs_launcher
def test_bad_mount_options_are_refused_naming_the_problem() -> None:
    assert CAPS.launcher is not None
    for args, message in (
        (["--mount", "1:/tmp"], "--mount is not FD:DIR: 1:/tmp"),
        (["--mount", "7"], "--mount is not FD:DIR: 7"),
        (["--mount", "7:tmp"], "--mount needs an absolute DIR: 7:tmp"),
        (["--read-only", "sys"], "--read-only needs an absolute path: sys"),
        (["--read-only", "/nonexistent"], "read-only: /nonexistent: No such file"),
        (["--mount", "9:/tmp"], "move_mount to: /tmp: Bad file descriptor"),
    ):
        done = subprocess.run(
            [CAPS.launcher, *args, "--", "/bin/true"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        assert done.returncode == 126, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
