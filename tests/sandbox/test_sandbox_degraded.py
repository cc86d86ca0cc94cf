"""Hosts with less: the same Sandbox with mechanisms switched off still kills and reports it."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import pytest

from producer.errors import IsolationUnavailable, SandboxError
from workers.sandbox import Capabilities, Sandbox
from workers.sandbox.launcher import CANNOT_DROP

from .helpers import CAPS, ESCAPEES, python, request, survivors, wait_pidfiles

NO_CGROUPS = {"memory_v1": None, "memsw": False, "pids_v1": None, "cgroup_v2": None}


def degraded(**changes: object) -> Capabilities:
    # Without execq-launch: these hosts are judged by the system's tools alone.
    return replace(CAPS, **{"launcher": None, **changes})  # type: ignore[arg-type]


@pytest.mark.skipif(not CAPS.subreaper, reason="needs PR_SET_CHILD_SUBREAPER")
def test_without_cgroups_the_subreaper_still_catches_escapees(
    tmp_path: Path, pids_dir: Path
) -> None:
    caps = degraded(**NO_CGROUPS, cgroup_kill=False)
    with Sandbox(workdir_root=tmp_path / "runs", capabilities=caps) as sb:
        r = sb.run(python(ESCAPEES, str(pids_dir), timeout_s=1))
    assert r.killed == "timeout"
    assert r.enforced["kill"] == "killpg+subreaper"
    assert r.enforced["memory"] == "rlimit-as (virtual, 4x)"
    assert r.duration_s < 2.5
    assert survivors(wait_pidfiles(pids_dir, ["command", "setsid", "daemon"]).values()) == []


@pytest.mark.skipif(CAPS.cgroup_v2 is None, reason="needs a writable cgroup v2 with cgroup.kill")
def test_with_only_cgroup_v2_the_process_joins_before_the_spawn_and_kill_works(
    tmp_path: Path, pids_dir: Path
) -> None:
    caps = degraded(memory_v1=None, memsw=False, pids_v1=None)
    with Sandbox(workdir_root=tmp_path / "runs", capabilities=caps) as sb:
        r = sb.run(python(ESCAPEES, str(pids_dir), timeout_s=1))
        cg = sb.run(request("/bin/cat", "/proc/self/cgroup")).stdout
    assert r.killed == "timeout"
    assert r.enforced["kill"].startswith("killpg+cgroup.kill")
    assert survivors(wait_pidfiles(pids_dir, ["command", "setsid", "daemon"]).values()) == []
    v2_line = next(line for line in cg.splitlines() if line.startswith("0::"))
    assert "/execq-" in v2_line
    assert "/execq-" not in Path("/proc/self/cgroup").read_text()


def test_without_prlimit_limits_are_set_after_the_spawn(tmp_path: Path) -> None:
    caps = degraded(prlimit=None)
    with Sandbox(workdir_root=tmp_path / "runs", capabilities=caps) as sb:
        r = sb.run(python("import time; time.sleep(0.2)\nwhile True: pass", cpu_s=1))
    assert r.killed == "cpu" and r.signal == signal.SIGXCPU
    assert r.enforced["cpu"] == "rlimit-after-spawn"


def test_with_nothing_but_setpriv_a_timeout_still_kills_the_process_group(
    tmp_path: Path, pids_dir: Path
) -> None:
    caps = degraded(**NO_CGROUPS, cgroup_kill=False, prlimit=None, pdeathsig=False)
    caps = replace(caps, subreaper=False)
    script = f"sleep 30 & echo $! > {pids_dir}/a.pid; sleep 30 & echo $! > {pids_dir}/b.pid; wait"
    with Sandbox(workdir_root=tmp_path / "runs", capabilities=caps) as sb:
        r = sb.run(request("/bin/sh", "-c", script, timeout_s=0.5))
    assert r.killed == "timeout"
    assert r.enforced["kill"] == "killpg"
    assert r.enforced["parent_death"] == "none"
    assert r.duration_s < 2
    assert survivors(wait_pidfiles(pids_dir, ["a", "b"]).values()) == []


def test_a_host_that_cannot_drop_capabilities_refuses_to_run_commands(tmp_path: Path) -> None:
    caps = degraded(setpriv=None)
    assert caps.can_isolate(run_as=False, no_network=False) == CANNOT_DROP
    assert caps.mechanisms()["capabilities"] == "kept (no execq-launch or setpriv)"
    with (
        Sandbox(workdir_root=tmp_path / "runs", capabilities=caps) as sb,
        pytest.raises(SandboxError, match="dropping them needs execq-launch"),
    ):
        sb.run(request("/bin/true"))
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_required_limit_the_host_cannot_enforce_is_refused_up_front(tmp_path: Path) -> None:
    caps = degraded(**NO_CGROUPS, cgroup_kill=False)
    with pytest.raises(IsolationUnavailable, match="'memory' is required"):
        Sandbox(workdir_root=tmp_path, capabilities=caps, required={"memory"})


@pytest.mark.skipif(
    CAPS.memory_v1 is None or CAPS.pids_v1 is None or not CAPS.cgroup_kill,
    reason="needs cgroup-v1 memory and pids plus cgroup v2 kill (root on a hybrid host)",
)
def test_required_limits_that_this_host_enforces_are_accepted(tmp_path: Path) -> None:
    required = {"memory", "processes", "kill", "cpu", "file_size", "parent_death"}
    with Sandbox(workdir_root=tmp_path, required=required) as sb:
        assert sb.run(request("/bin/true")).exit_code == 0
