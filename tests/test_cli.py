"""The `execq` entry itself: --version, and -h as --help on every command."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

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
