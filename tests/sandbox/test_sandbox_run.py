"""Sandbox.run basics: output, exit codes, a clean environment, a private directory, no stdin."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from producer.errors import ExecutableRefused, SandboxError
from workers.sandbox import Sandbox
from workers.sandbox import workdir as workdir_module
from workers.sandbox.procfs import is_alive, start_ticks

from .helpers import PY, python, request

SHOW_PLACE = """
import json, os, stat
home = os.environ["HOME"]
print(json.dumps({"cwd": os.getcwd(), "home": home, "tmpdir": os.environ["TMPDIR"],
                  "mode": stat.S_IMODE(os.stat(home).st_mode)}))
"""


def test_stdout_and_stderr_are_captured_separately(sandbox: Sandbox) -> None:
    r = sandbox.run(python("import sys; print('to out'); print('to err', file=sys.stderr)"))
    assert (r.exit_code, r.signal, r.killed) == (0, None, None)
    assert r.stdout == "to out\n" and r.stderr == "to err\n"
    assert (r.stdout_bytes, r.stderr_bytes) == (7, 7)
    assert not r.stdout_truncated and not r.stderr_truncated
    assert r.executable == os.path.realpath(PY)


def test_an_exit_status_is_reported_as_is(sandbox: Sandbox) -> None:
    assert sandbox.run(python("raise SystemExit(3)")).exit_code == 3
    assert sandbox.run(request("/bin/false")).exit_code == 1


def test_a_signal_death_is_128_plus_the_signal(sandbox: Sandbox) -> None:
    r = sandbox.run(python("import os, signal; os.kill(os.getpid(), signal.SIGTERM)"))
    assert (r.exit_code, r.signal, r.killed) == (128 + signal.SIGTERM, signal.SIGTERM, None)


def test_invalid_utf8_is_replaced_not_fatal(sandbox: Sandbox) -> None:
    r = sandbox.run(python("import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe end')"))
    assert r.stdout == "ok \ufffd\ufffd end"


def test_argv_is_passed_verbatim_and_injection_strings_are_inert(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    created = tmp_path / "created-by-injection"
    canary = tmp_path / "canary"
    canary.mkdir()
    args = (f"$(touch {created})", f"; rm -rf {canary}", f"`touch {created}`", "&& id", "'\"*")
    r = sandbox.run(request("/bin/echo", *args))
    assert r.exit_code == 0
    assert r.stdout == " ".join(args) + "\n"
    assert not created.exists() and canary.is_dir()


def test_the_worker_environment_never_reaches_the_child(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXECQ_CANARY_SECRET", "must-not-leak")
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    env = {"TRACEPARENT": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "X": "1"}
    r = sandbox.run(request("/usr/bin/env", env=env))
    seen = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert set(seen) == {"PATH", "HOME", "TMPDIR", "LANG", "TRACEPARENT", "X"}
    assert seen["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert seen["LANG"] == "C.UTF-8"
    assert seen["HOME"] == seen["TMPDIR"]
    assert seen["TRACEPARENT"] == env["TRACEPARENT"]
    assert "must-not-leak" not in r.stdout


def test_the_request_cannot_override_path_home_or_tmpdir(sandbox: Sandbox) -> None:
    r = sandbox.run(request("/usr/bin/env", env={"PATH": "/evil", "HOME": "/", "LANG": "C"}))
    seen = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert seen["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert seen["HOME"] != "/" and seen["TMPDIR"] == seen["HOME"]
    assert seen["LANG"] == "C"  # LANG is the request's to choose


def test_cwd_home_and_tmpdir_are_one_private_0700_directory(sandbox: Sandbox) -> None:
    place = json.loads(sandbox.run(python(SHOW_PLACE)).stdout)
    assert place["cwd"] == place["home"] == place["tmpdir"]
    assert place["mode"] == 0o700
    assert Path(place["home"]).parent == sandbox.workdir_root


def test_private_directories_are_distinct_per_run_and_removed_afterwards(
    sandbox: Sandbox,
) -> None:
    code = SHOW_PLACE + "open('left-behind', 'w').write('x'); os.mkdir('sub')"
    homes = [json.loads(sandbox.run(python(code)).stdout)["home"] for _ in range(3)]
    assert len(set(homes)) == 3
    assert not any(os.path.exists(h) for h in homes)
    assert list(sandbox.workdir_root.iterdir()) == []


def test_the_private_directory_is_removed_after_a_timeout(sandbox: Sandbox) -> None:
    code = SHOW_PLACE + "import sys, time; sys.stdout.flush(); time.sleep(30)"
    r = sandbox.run(python(code, timeout_s=0.5))
    assert r.killed == "timeout"
    assert not os.path.exists(json.loads(r.stdout)["home"])


def test_stdin_is_empty(sandbox: Sandbox) -> None:
    r = sandbox.run(request("/bin/cat", timeout_s=5))
    assert (r.exit_code, r.stdout, r.killed) == (0, "", None)
    assert r.duration_s < 2


def test_on_spawn_receives_the_pid_that_leads_the_process_group(sandbox: Sandbox) -> None:
    seen: list[int] = []
    r = sandbox.run(python("import os; print(os.getpid(), os.getpgid(0))"), on_spawn=seen.append)
    pid, pgid = map(int, r.stdout.split())
    assert seen == [r.pid] == [pid] == [pgid]


def test_a_failing_on_spawn_kills_the_command_and_cleans_up(
    sandbox: Sandbox, pids_dir: Path
) -> None:
    def boom(pid: int) -> None:
        (pids_dir / "spawned").write_text(str(pid))
        raise RuntimeError("lease store down")

    with pytest.raises(RuntimeError, match="lease store down"):
        sandbox.run(request("/bin/sleep", "30"), on_spawn=boom)
    pid = int((pids_dir / "spawned").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert list(sandbox.workdir_root.iterdir()) == []


def test_a_refused_executable_never_spawns_anything(sandbox: Sandbox) -> None:
    spawned: list[int] = []
    with pytest.raises(ExecutableRefused):
        sandbox.run(request("/bin/ls", allowed=["/bin/echo"]), on_spawn=spawned.append)
    assert spawned == []
    assert list(sandbox.workdir_root.iterdir()) == []


def test_nonsense_limits_and_nul_bytes_are_refused(sandbox: Sandbox) -> None:
    with pytest.raises(SandboxError, match="timeout_s"):
        sandbox.run(request("/bin/true", timeout_s=0))
    with pytest.raises(SandboxError, match="NUL"):
        sandbox.run(request("/bin/echo", "a\x00b"))
    with pytest.raises(SandboxError, match="environment"):
        sandbox.run(request("/bin/true", env={"A=B": "x"}))


def test_a_closed_sandbox_refuses_to_run(tmp_path: Path) -> None:
    sb = Sandbox(workdir_root=tmp_path)
    sb.close()
    with pytest.raises(SandboxError, match="closed"):
        sb.run(request("/bin/true"))


def test_concurrent_runs_from_threads_each_get_their_own_result(sandbox: Sandbox) -> None:
    results: dict[int, str] = {}

    def one(i: int) -> None:
        results[i] = sandbox.run(python(f"import time; time.sleep(0.2); print({i})")).stdout

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"{i}\n" for i in range(4)}


def test_a_tree_of_unreadable_directories_is_removed_without_privileges() -> None:
    # What a command may leave behind: nested directories it made 000. A worker without
    # CAP_DAC_OVERRIDE (a container dropping it, or a non-root worker) must still remove them.
    if os.geteuid() != 0:
        pytest.skip("needs root to run the removal as another uid")
    # pytest's tmp_path lies under a root-only directory: use one the other uid can reach.
    base = Path(tempfile.mkdtemp(dir="/var/tmp"))
    os.chown(base, 41500, 41500)
    root = base / "run"
    code = """
import importlib.util, os, sys
# workdir.py by its path: it needs nothing but the standard library.
spec = importlib.util.spec_from_file_location("workdir", sys.argv[2])
workdir = importlib.util.module_from_spec(spec)
spec.loader.exec_module(workdir)
root = sys.argv[1]
os.makedirs(os.path.join(root, "a", "b", "c"))
open(os.path.join(root, "a", "b", "c", "f"), "w").close()
os.chmod(os.path.join(root, "a", "b", "c"), 0)
os.chmod(os.path.join(root, "a", "b"), 0)
os.chmod(os.path.join(root, "a"), 0)
workdir._remove_tree(root)
print("gone" if not os.path.lexists(root) else "left")
"""
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=41500",
            "--regid=41500",
            "--clear-groups",
            "--",
            sys.executable,
            "-I",
            "-c",
            code,
            str(root),
            str(Path(workdir_module.__file__)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert done.stdout.strip() == "gone", done.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_private_directories_of_a_process_that_died_mid_run_are_removed(
    sandbox: Sandbox,
) -> None:
    # A pool process killed mid-run never reaches its `finally`: its directory stays until
    # the next process's first run under that root removes it. A live process's, and names
    # execq did not make, stay.
    root = sandbox.workdir_root
    root.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen(["/bin/sleep", "0.3"])
    ticks = start_ticks(dead.pid)
    dead.wait()
    gone = root / f"cmd-a-{dead.pid}.{ticks}-abcd_123"
    (gone / "sub").mkdir(parents=True)
    (gone / "sub" / "file").write_text("x")
    os.chmod(gone / "sub", 0)
    alive = root / f"cmd-b-{os.getpid()}.{start_ticks(os.getpid())}-abcd_123"
    alive.mkdir()
    foreign = root / "not-made-by-execq"
    foreign.mkdir()

    assert workdir_module.sweep_stale_dirs(root, is_alive) == [gone.name]
    assert not gone.exists() and alive.exists() and foreign.exists()


def test_a_private_directory_names_the_process_that_made_it(sandbox: Sandbox) -> None:
    home = Path(json.loads(sandbox.run(python(SHOW_PLACE)).stdout)["home"])
    assert home.name.startswith(f"test-{os.getpid()}.{start_ticks(os.getpid())}-")
