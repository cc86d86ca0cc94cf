"""The `execq` entry itself: --version, and -h as --help on every command."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from producer.spec import CommandSpec
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from tests.conftest import Env, run_cli
from workers.cli import app
from workers.clikit import command_tree

ROOT = Path(__file__).resolve().parent.parent


def test_version_prints_what_pyproject_declares() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, f"{declared}\n"), result.stderr


def _paths(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path of the tree (Typer carries its own copy of click: no isinstance)."""
    yield path
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _paths(sub, (*path, name))


COMMANDS = list(_paths(typer.main.get_command(app)))


def test_the_walk_reaches_sub_commands() -> None:
    assert {("worker",), ("db", "upgrade"), ("audit", "verify")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "execq")
def test_h_is_help_on_every_command(path: tuple[str, ...]) -> None:
    runner = CliRunner()
    long = runner.invoke(app, [*path, "--help"], prog_name="execq", terminal_width=100)
    short = runner.invoke(app, [*path, "-h"], prog_name="execq", terminal_width=100)
    assert long.exit_code == 0, long.output
    assert (short.exit_code, short.output) == (0, long.output)
    assert "Usage: execq" in long.output


PYTHON_TYPE = re.compile(
    r"<(bool|str|int|float|path|datetime|list\[\w+\])>|\b(TEXT|INTEGER|FLOAT|BOOLEAN|FILENAME)\b"
)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "execq")
def test_help_shows_metavars_never_python_types(
    path: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tree `execq` runs (its metavars set), not Typer's default rendering of the app.
    monkeypatch.setattr(typer.testing, "_get_command", command_tree)
    shown = CliRunner().invoke(app, [*path, "-h"], prog_name="execq", terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert not PYTHON_TYPE.search(shown.output), shown.output


def test_short_options_for_the_frequent_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(typer.testing, "_get_command", command_tree)
    expected = {
        ("submit",): {"-t": "--tenant", "-k": "--key", "-w": "--wait"},
        ("submit-batch",): {"-t": "--tenant", "-k": "--key", "-w": "--wait"},
        ("list",): {"-t": "--tenant"},
        ("worker",): {"-t": "--tenant", "-c": "--concurrency"},
        ("logs",): {"-f": "--follow"},
        ("rollback",): {"-w": "--wait"},
        ("actions",): {"-t": "--tenant"},
        ("audit", "verify"): {"-t": "--tenant"},
        ("token", "create"): {"-t": "--tenant"},
    }
    tree = command_tree(app)
    for path, shorts in expected.items():
        command = tree
        for name in path:
            command = command.commands[name]
        opts = {tuple(p.opts) for p in command.params}
        for short, long in shorts.items():
            assert (long, short) in opts or (short, long) in opts, (path, short, opts)
    # Each short option means one thing wherever it appears.
    meaning: dict[str, set[str]] = {}
    for path in COMMANDS:
        command = tree
        for name in path:
            command = command.commands[name]
        for param in getattr(command, "params", []):
            longs = [o for o in param.opts if o.startswith("--")]
            for short in (o for o in param.opts if len(o) == 2 and o != "-h"):
                meaning.setdefault(short, set()).update(longs)
    assert all(len(longs) == 1 for longs in meaning.values()), meaning


# --- against a store ---------------------------------------------------------------------


@pytest.fixture
def cli_env(make_env: Callable[..., Env], redis_url: str, tmp_path: Path) -> Env:
    """Settings for `execq` subprocesses: a migrated SQLite store and the test Redis."""
    built = make_env(f"sqlite:///{tmp_path}/cli.db", redis_url)
    upgrade(make_engine(built.settings.database_url))
    return built


def test_a_refused_submit_prints_the_id_it_is_recorded_under(cli_env: Env) -> None:
    text = run_cli(cli_env, "submit", "--tenant", "beta", "--", "/bin/echo", "-rf")
    assert text.returncode == 1, text.stderr
    found = re.search(r"recorded as ([0-9a-f-]{36})", text.stderr)
    assert found is not None, text.stderr
    shown = run_cli(cli_env, "status", found.group(1), "--json")
    assert json.loads(shown.stdout)["state"] == "rejected"
    as_json = run_cli(cli_env, "submit", "--tenant", "beta", "--json", "--", "/bin/echo", "-rf")
    body = json.loads(as_json.stdout)
    assert as_json.returncode == 1 and body["state"] == "rejected" and body["rule"]
    assert json.loads(run_cli(cli_env, "status", body["id"], "--json").stdout)["id"] == body["id"]


def test_a_submit_for_a_tenant_not_in_the_file_leaves_no_record(cli_env: Env) -> None:
    for args in (("--", "/bin/echo", "hi"), ("--action", "greet", "--param", "name=bob")):
        done = run_cli(cli_env, "submit", "--tenant", "nobody", *args)
        assert done.returncode == 2, done.stderr
        assert "'nobody' is not defined (known: alpha, beta)" in done.stderr
    listed = run_cli(cli_env, "list", "--json")
    assert (listed.returncode, json.loads(listed.stdout)) == (0, [])


# --- Ctrl-C and the spinner ----------------------------------------------------------------


def _cli(env: Env, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env.vars, "COLUMNS": "100"},
        **kwargs,
    )


ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def _read_until(fd: int, needle: bytes, timeout: float = 30) -> bytes:
    """What a terminal shows (colours removed) until `needle` appears or the time is up."""
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in ANSI.sub(b"", seen) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return ANSI.sub(b"", seen)


def _pending(env: Env) -> str:
    # No worker runs in these tests: the command stays pending.
    with env.producer() as producer:
        return producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"])).id


def test_wait_on_a_terminal_spins_with_state_and_time_and_ctrl_c_leaves_the_command(
    cli_env: Env,
) -> None:
    command_id = _pending(cli_env)
    primary, secondary = pty.openpty()
    proc = _cli(
        cli_env, "wait", command_id[:8], stdin=secondary, stdout=secondary, stderr=secondary
    )
    os.close(secondary)
    try:
        shown = _read_until(primary, b"pending for 0m0")
        assert f"{command_id} pending for 0m0".encode() in shown, shown
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        text = (shown + _read_until(primary, b"wait " + command_id.encode(), 5)).decode()
        text = " ".join(text.split())  # a terminal's message may wrap at its width
    finally:
        proc.kill()
        os.close(primary)
    assert "Traceback" not in text
    assert f"command {command_id} keeps running" in text
    assert f"execq logs {command_id} -f" in text and f"execq wait {command_id}" in text


def test_wait_into_a_pipe_shows_no_spinner_and_ctrl_c_says_one_line(cli_env: Env) -> None:
    command_id = _pending(cli_env)
    proc = _cli(cli_env, "wait", command_id, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(3)  # well past start-up: waiting
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and stdout == b""
    assert stderr.decode().splitlines() == [
        f"interrupted: command {command_id} keeps running; follow it with "
        f"`execq logs {command_id} -f` or `execq wait {command_id}`"
    ]


@pytest.mark.parametrize("after_s", [0.3, 0.8])
def test_ctrl_c_during_start_up_is_one_line_and_status_130(cli_env: Env, after_s: float) -> None:
    proc = _cli(cli_env, "list", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    if proc.returncode == 0:
        pytest.skip("the command was done before the signal came")  # a fast machine
    if proc.returncode == -signal.SIGINT and stdout and not stderr:
        # Done and printed, then the signal came while the interpreter was exiting (it puts
        # the default handlers back): a shell shows 130 all the same. Not start-up.
        pytest.skip("the signal came after the command was done, during the exit")
    assert proc.returncode == 130, stderr
    assert b"Traceback" not in stderr and stderr.decode().strip() == "interrupted"


def test_errors_are_one_line_into_a_pipe_naming_the_yaml_file_and_line(
    cli_env: Env, tmp_path: Path
) -> None:
    bad = tmp_path / ("a-directory-name-long-enough-to-pass-eighty-columns-" * 2) / "t.yaml"
    bad.parent.mkdir()
    bad.write_text("tenants:\n  acme: [unclosed\n")
    done = run_cli(cli_env, "list", extra={"EXECQ_TENANTS_FILE": str(bad)})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: invalid tenants file {bad}:3:1: while parsing a flow sequence: "
        "expected ',' or ']', but got '<stream end>'"
    ]
    usage = run_cli(cli_env, "list", "--limit", "many")
    assert usage.returncode == 2 and len(usage.stderr.splitlines()) == 1, usage.stderr
    assert "--limit" in usage.stderr and "list -h" in usage.stderr
