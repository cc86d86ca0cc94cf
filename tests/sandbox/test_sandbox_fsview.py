"""A filesystem view of the command's own (bubblewrap): read-only host, private /tmp and
directory, no daemons' sockets, its own process list, and the same kill and limits."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest

from producer.errors import SandboxError
from workers.sandbox import Sandbox, detect_capabilities
from workers.sandbox.model import FsView

from .helpers import ATTEMPT, python, request

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
HAS_BWRAP = detect_capabilities().bwrap is not None
# CI installs bubblewrap (.ci/run): there the view must be tested, never skipped.
pytestmark = pytest.mark.skipif(
    not HAS_BWRAP and not CI, reason=f"no bubblewrap: {detect_capabilities().bwrap_problem}"
)

LOOK_AROUND = (
    ATTEMPT
    + """
import json, os, sys
attempt("write_usr", lambda: open("/usr/execq-probe", "w"))
attempt("write_home", lambda: open(os.path.join(os.environ["HOME"], "mine"), "w").write("x"))
attempt("write_tmp", lambda: open("/tmp/mine", "w").write("x"))
attempt("write_shared", lambda: open(sys.argv[1] + "/from-command", "w").write("hello"))
out["run"] = sorted(os.listdir("/run"))
out["hidden"] = sorted(os.listdir(sys.argv[2]))
out["siblings"] = sorted(os.listdir(os.path.dirname(os.getcwd())))
out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["cwd"] = os.getcwd()
print(json.dumps(out))
"""
)


def _view(tmp_path: Path, **kw: object) -> FsView:
    shared = tmp_path / "shared"
    shared.mkdir(exist_ok=True)
    hidden = tmp_path / "hidden"
    hidden.mkdir(exist_ok=True)
    (hidden / "secret.txt").write_text("not for commands")
    return FsView(tmp_mb=int(kw.get("tmp_mb", 8)), writable=(str(shared),), hidden=(str(hidden),))


def test_the_host_is_read_only_and_only_the_commands_own_places_are_writable(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    view = _view(tmp_path)
    # A sibling run's directory must not be visible from inside.
    (sandbox.workdir_root / "other-command").mkdir()
    req = python(LOOK_AROUND, view.writable[0], view.hidden[0])
    r = sandbox.run(dataclasses.replace(req, filesystem=view))
    assert r.exit_code == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["write_usr"] == 30  # EROFS
    assert seen["write_home"] == seen["write_tmp"] == seen["write_shared"] == "ok"
    assert (tmp_path / "shared" / "from-command").read_text() == "hello"
    assert not Path("/tmp/mine").exists() or Path("/tmp/mine").read_text() != "x"
    assert seen["run"] == [] and seen["hidden"] == []
    assert seen["siblings"] == [os.path.basename(seen["cwd"])]
    # Its own process list: the view's init (pid 1) and the command.
    assert seen["pids"] == [1, 2], seen["pids"]
    assert r.enforced["filesystem"].startswith("bubblewrap")
    # The host's files are as they were.
    assert (tmp_path / "hidden" / "secret.txt").read_text() == "not for commands"


def test_the_private_tmp_is_capped(sandbox: Sandbox, tmp_path: Path) -> None:
    fill = "open('/tmp/big', 'wb').write(b'x' * (3 * 1024 * 1024))"
    r = sandbox.run(dataclasses.replace(python(fill), filesystem=_view(tmp_path, tmp_mb=1)))
    assert r.exit_code != 0
    assert "No space left on device" in r.stderr


def test_a_hidden_file_cannot_be_read(sandbox: Sandbox, tmp_path: Path) -> None:
    # Under a writable directory, so that /tmp's own privacy is not what hides it.
    shared = tmp_path / "shared"
    shared.mkdir()
    key = shared / "signing.key"
    key.write_text("k" * 64)
    view = FsView(tmp_mb=8, writable=(str(shared),), hidden=(str(key),))
    r = sandbox.run(dataclasses.replace(request("/bin/cat", str(key)), filesystem=view))
    # /dev/null bound over it, without device access in the view: opening it is refused.
    assert r.exit_code == 1 and r.stdout == ""
    assert "Permission denied" in r.stderr


def _running(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_a_timeout_kills_everything_in_the_view(sandbox: Sandbox, tmp_path: Path) -> None:
    # A grandchild in a session of its own would outlive a plain process-group kill.
    marker = f"{60 + os.getpid() % 1000 / 1000:.3f}"
    code = f"""
import os, subprocess
subprocess.Popen(["/bin/sleep", "{marker}"], start_new_session=True)
os.execv("/bin/sleep", ["/bin/sleep", "{marker}"])
"""
    req = python(code, timeout_s=1.5)
    r = sandbox.run(dataclasses.replace(req, filesystem=_view(tmp_path)))
    assert r.killed == "timeout"
    assert _running(marker) == []


def test_a_signal_is_reported_as_without_the_view(sandbox: Sandbox, tmp_path: Path) -> None:
    req = python("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    r = sandbox.run(dataclasses.replace(req, filesystem=_view(tmp_path)))
    assert (r.exit_code, r.signal) == (128 + signal.SIGTERM, signal.SIGTERM)
    cpu = python("while True: pass", cpu_s=1, timeout_s=10)
    r = sandbox.run(dataclasses.replace(cpu, filesystem=_view(tmp_path)))
    assert r.killed == "cpu"


def test_a_missing_writable_directory_is_refused_by_name(sandbox: Sandbox, tmp_path: Path) -> None:
    view = FsView(writable=(str(tmp_path / "absent"),))
    with pytest.raises(SandboxError, match="absent does not exist"):
        sandbox.run(dataclasses.replace(request("/bin/true"), filesystem=view))


def test_a_host_without_bubblewrap_says_why() -> None:
    caps = dataclasses.replace(
        detect_capabilities(), bwrap=None, bwrap_problem="bwrap is not installed"
    )
    why = caps.can_isolate(run_as=False, no_network=False, filesystem=True)
    assert why == "a filesystem view needs bubblewrap: bwrap is not installed"
    assert caps.can_isolate(run_as=False, no_network=False, filesystem=False) is None
