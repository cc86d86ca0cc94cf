"""Nothing of a command outlives it: process groups, escapees, daemons, and its pool process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from workers.sandbox import Sandbox, sweep_stale

from .helpers import (
    CAN_CATCH_ESCAPEES,
    CAPS,
    ESCAPEES,
    HAS_CGROUP,
    PIDFILE,
    execq_cgroups,
    python,
    request,
    survivors,
    wait_pidfiles,
)

needs_escapee_catcher = pytest.mark.skipif(
    not CAN_CATCH_ESCAPEES,
    reason="catching setsid/double-fork escapees needs a cgroup or PR_SET_CHILD_SUBREAPER",
)
needs_cgroup = pytest.mark.skipif(not HAS_CGROUP, reason="needs writable cgroups (root)")
needs_pdeathsig = pytest.mark.skipif(
    not CAPS.pdeathsig, reason="needs setpriv with --pdeathsig (util-linux >= 2.33)"
)

POOL = Path(__file__).with_name("pool_process.py")


def test_a_timeout_kills_the_whole_process_group(sandbox: Sandbox, pids_dir: Path) -> None:
    code = (
        PIDFILE
        + """
import subprocess, sys
kids = [subprocess.Popen(["/bin/sleep", "60"]) for _ in range(3)]
for i, k in enumerate(kids):
    pidfile(sys.argv[1], f"kid{i}", k.pid)
pidfile(sys.argv[1], "command")
for k in kids:
    k.wait()
"""
    )
    r = sandbox.run(python(code, str(pids_dir), timeout_s=1))
    assert r.killed == "timeout"
    pids = wait_pidfiles(pids_dir, ["command", "kid0", "kid1", "kid2"])
    assert survivors(pids.values()) == []


@needs_escapee_catcher
def test_a_timeout_kills_a_setsid_escapee_and_a_double_fork_daemon(
    sandbox: Sandbox, pids_dir: Path
) -> None:
    r = sandbox.run(python(ESCAPEES, str(pids_dir), timeout_s=1.5))
    assert r.killed == "timeout"
    pids = wait_pidfiles(pids_dir, ["command", "setsid", "daemon"])
    assert survivors(pids.values(), timeout_s=1) == []
    assert r.duration_s < 4


@needs_escapee_catcher
def test_cancel_kills_the_tree_including_escapees(sandbox: Sandbox, pids_dir: Path) -> None:
    cancel = threading.Event()

    def cancel_when_ready() -> None:
        wait_pidfiles(pids_dir, ["command", "setsid", "daemon"])
        cancel.set()

    t = threading.Thread(target=cancel_when_ready)
    t.start()
    r = sandbox.run(python(ESCAPEES, str(pids_dir), timeout_s=30), cancel=cancel)
    t.join()
    assert r.killed == "cancelled"
    assert r.duration_s < 5
    assert survivors(wait_pidfiles(pids_dir, ["command", "setsid", "daemon"]).values()) == []


@needs_escapee_catcher
def test_a_daemonized_grandchild_does_not_outlive_a_successful_command(
    sandbox: Sandbox, pids_dir: Path
) -> None:
    code = (
        PIDFILE
        + """
import sys, time
d = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    pidfile(d, "daemon")
    time.sleep(60)
    os._exit(0)
while not os.path.exists(os.path.join(d, "daemon.pid")):
    time.sleep(0.01)
print("done")
"""
    )
    r = sandbox.run(python(code, str(pids_dir)))
    assert (r.exit_code, r.killed, r.stdout) == (0, None, "done\n")
    assert r.duration_s < 0.5 + 1, "the daemon closed its pipes: no grace period needed"
    assert survivors(wait_pidfiles(pids_dir, ["daemon"]).values(), timeout_s=0.5) == []


def test_a_background_child_holding_the_pipe_is_killed_after_the_grace(
    sandbox: Sandbox, pids_dir: Path
) -> None:
    code = (
        PIDFILE
        + """
import subprocess, sys
kid = subprocess.Popen(["/bin/sleep", "60"])
pidfile(sys.argv[1], "kid", kid.pid)
print("main done")
"""
    )
    r = sandbox.run(python(code, str(pids_dir)))
    assert (r.exit_code, r.killed, r.stdout) == (0, None, "main done\n")
    assert 0.4 < r.duration_s < 2
    assert survivors(wait_pidfiles(pids_dir, ["kid"]).values(), timeout_s=0.5) == []


def test_a_command_that_closes_its_pipes_is_still_waited_for(sandbox: Sandbox) -> None:
    r = sandbox.run(request("/bin/sh", "-c", "exec >&- 2>&-; sleep 0.3; exit 4"))
    assert (r.exit_code, r.killed) == (4, None)
    assert r.duration_s >= 0.3


@needs_pdeathsig
@needs_cgroup
def test_a_command_does_not_outlive_its_pool_process(tmp_path: Path, pids_dir: Path) -> None:
    pool = subprocess.Popen(
        [sys.executable, str(POOL), str(tmp_path / "runs"), str(pids_dir)],
        stdin=subprocess.DEVNULL,
    )
    try:
        pids = wait_pidfiles(pids_dir, ["command", "grandchild"], timeout_s=30)
    finally:
        pool.kill()
        pool.wait()
    # The command's own parent died: setpriv's pdeathsig kills it at once.
    assert survivors([pids["command"]], timeout_s=2) == []
    # Its setsid grandchild is caught by the next pool process's startup sweep.
    stale = [n for n in sweep_stale() if n.startswith(f"execq-{pool.pid}-")]
    assert stale, "the dead pool process's cgroup was not found"
    assert survivors([pids["grandchild"]], timeout_s=2) == []
    assert not any(n.startswith(f"execq-{pool.pid}-") for n in execq_cgroups())


@needs_cgroup
def test_the_sweep_leaves_cgroups_of_live_pool_processes_alone(sandbox: Sandbox) -> None:
    assert sandbox.run(request("/bin/true")).exit_code == 0
    mine = {n for n in execq_cgroups() if n.startswith(f"execq-{os.getpid()}-")}
    assert mine
    assert mine.isdisjoint(sweep_stale())
    assert mine <= execq_cgroups()


@needs_cgroup
def test_close_removes_this_process_cgroups(tmp_path: Path) -> None:
    sb = Sandbox(workdir_root=tmp_path)
    sb.run(request("/bin/true"))
    assert any(n.startswith(f"execq-{os.getpid()}-") for n in execq_cgroups())
    sb.close()
    assert not any(n.startswith(f"execq-{os.getpid()}-") for n in execq_cgroups())


@needs_cgroup
def test_only_the_spawning_thread_enters_the_cgroup(sandbox: Sandbox) -> None:
    seen: dict[str, str] = {}

    def worker() -> None:
        seen["child"] = sandbox.run(request("/bin/cat", "/proc/self/cgroup")).stdout

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    memory_line = next(x for x in seen["child"].splitlines() if ":memory:" in x)
    if CAPS.memory_v1:
        assert "/execq-" in memory_line
    for task in os.listdir("/proc/self/task"):
        try:
            cgroups = Path(f"/proc/self/task/{task}/cgroup").read_text()
        except (ProcessLookupError, FileNotFoundError):
            continue  # another test's background thread ended meanwhile
        assert "/execq-" not in cgroups


@needs_cgroup
def test_a_fork_bomb_is_contained_and_cleaned_up(sandbox: Sandbox) -> None:
    code = """
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
"""
    r = sandbox.run(python(code, processes=20, timeout_s=1))
    assert r.killed == "timeout"
    time.sleep(0.05)
    for name in execq_cgroups():
        if name.startswith(f"execq-{os.getpid()}-") and CAPS.pids_v1:
            procs = Path(CAPS.pids_v1, name, "cgroup.procs").read_text().split()
            assert procs == []
