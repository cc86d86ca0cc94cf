"""execq-launch: one exec applies a command's rlimits, identity and parent-death signal."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from workers.sandbox import Sandbox, detect_capabilities
from workers.sandbox.wrapper import build_launch

from .helpers import LIMITS, python

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
CAPS = detect_capabilities()
LAUNCHER = CAPS.launcher
pytestmark = pytest.mark.skipif(
    LAUNCHER is None and not CI, reason="execq-launch is not built (make install)"
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root")


def launch(*args: str) -> subprocess.CompletedProcess[str]:
    assert LAUNCHER is not None, "execq-launch is not built: make install builds it"
    return subprocess.run(
        [LAUNCHER, *args], capture_output=True, text=True, timeout=10, check=False
    )


def test_the_launcher_is_the_only_wrapper_before_the_command() -> None:
    assert LAUNCHER is not None, "execq-launch is not built: make install builds it"
    built = build_launch(
        "/bin/true", [], LIMITS, CAPS, memory_cgroup=True, pids_cgroup=True, kill="killpg"
    )
    assert built.argv[0] == LAUNCHER
    assert built.argv[-2:] == ("--", "/bin/true")
    assert "--pdeathsig" in built.argv and f"cpu={LIMITS.cpu_s}:{LIMITS.cpu_s + 1}" in built.argv
    assert not any(a.endswith(("prlimit", "setpriv")) for a in built.argv)
    assert built.enforced["parent_death"] == "launcher-pdeathsig"


def test_bad_usage_is_refused_naming_the_problem() -> None:
    for args, message in (
        (["--rlimit", "stack=1:1", "--", "/bin/true"], "unknown rlimit: stack"),
        (["--rlimit", "cpu=1", "--", "/bin/true"], "not NAME=SOFT:HARD"),
        (["--rlimit", "cpu=-1:2", "--", "/bin/true"], "bad rlimit value"),
        (["--uid", "1500", "--", "/bin/true"], "--uid and --gid go together"),
        (["--uid", "0", "--gid", "0", "--", "/bin/true"], "bad id for: --uid"),
        (["--bogus", "--", "/bin/true"], "unknown option: --bogus"),
        (["--rlimit", "core=0:0"], "no program after --"),
    ):
        done = launch(*args)
        assert (done.returncode, done.stdout) == (126, ""), args
        assert message in done.stderr, (args, done.stderr)
    missing = launch("--", "/nonexistent/program")
    assert missing.returncode == 127 and "cannot execute /nonexistent/program" in missing.stderr


def test_limits_apply_before_the_command_runs() -> None:
    done = launch(
        "--rlimit", "nofile=17:17", "--rlimit", "core=0:0", "--", "/bin/sh", "-c",
        "ulimit -n; ulimit -c",
    )  # fmt: skip
    assert (done.returncode, done.stdout.split()) == (0, ["17", "0"])


@needs_root
def test_the_identity_is_switched_with_no_groups_and_no_new_privileges(tmp_path: object) -> None:
    probe = "id -u; id -g; id -G; grep NoNewPrivs /proc/self/status | tr -d '\\t'"
    done = launch("--uid", "41700", "--gid", "41701", "--pdeathsig", "--", "/bin/sh", "-c", probe)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["41700", "41701", "41701", "NoNewPrivs:1"]


@needs_root
def test_a_sandboxed_run_as_and_no_network_command_goes_through_the_launcher_twice(
    sandbox: Sandbox,
) -> None:
    if sandbox.capabilities.launcher is None or not CAPS.unshare:
        pytest.skip("the launcher variant of the fixture, with unshare, tests this")
    req = dataclasses.replace(
        python("import os; print(os.getuid(), os.getgid(), os.getgroups())"),
        run_as=(41702, 41702),
        network=False,
    )
    built = build_launch(
        req.argv[0],
        req.argv[1:],
        req.limits,
        sandbox.capabilities,
        memory_cgroup=False,
        pids_cgroup=False,
        kill="killpg",
        run_as=req.run_as,
        network=False,
    )
    assert built.argv.count(LAUNCHER) == 2  # limits first, the identity after unshare
    r = sandbox.run(req)
    assert (r.exit_code, r.stdout.strip()) == (0, "41702 41702 []"), r.stderr
    assert r.enforced["identity"] == "uid 41702 gid 41702"
    assert r.enforced["network"].startswith("none")


def test_a_launcher_others_could_change_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert LAUNCHER is not None, "execq-launch is not built: make install builds it"
    copy = tmp_path / "execq-launch"
    shutil.copy(LAUNCHER, copy)
    monkeypatch.setenv("EXECQ_LAUNCHER", str(copy))
    try:
        copy.chmod(0o775)
        detect_capabilities.cache_clear()
        caps = detect_capabilities()
        assert caps.launcher != str(copy)
        assert any("is group-writable" in note for note in caps.notes), caps.notes
        # Under /tmp, but root's and writable by no one else: trusted as execq's own code is.
        copy.chmod(0o755)
        detect_capabilities.cache_clear()
        assert detect_capabilities().launcher == str(copy)
    finally:
        monkeypatch.delenv("EXECQ_LAUNCHER")
        detect_capabilities.cache_clear()
