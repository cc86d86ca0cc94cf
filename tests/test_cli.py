"""The `execq` entry itself: --version, and -h as --help on every command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from producer.store.db import make_engine
from producer.store.migrate import upgrade
from tests.conftest import Env, run_cli
from workers.cli import app

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
