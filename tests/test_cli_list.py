"""`execq list`: ids that paste back whatever the terminal's width, and `--watch`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from producer.spec import CommandSpec
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.store.repository import Store
from tests.conftest import Env, run_cli

ROOT = Path(__file__).resolve().parent.parent
# Long shared prefixes: one differs from another in its last character only.
IDS = (
    "3f2a91c0-5b1e-4c4e-9a43-6f0d2b7e8a19",
    "3f2a91c0-5b1e-4c4e-9a43-6f0d2b7e8a18",
    "3f2a91c0-5b1f-4c4e-9a43-6f0d2b7e8a19",
    "7d0c44e2-11aa-4bbb-8ccc-0123456789ab",
)


@pytest.fixture
def cli_env(make_env: Callable[..., Env], redis_url: str, tmp_path: Path) -> Env:
    """Settings for `execq` subprocesses: a migrated SQLite store with IDS in it."""
    built = make_env(f"sqlite:///{tmp_path}/cli.db", redis_url)
    engine = make_engine(built.settings.database_url)
    upgrade(engine)
    store = Store(engine)
    for cid in IDS:
        spec = CommandSpec(tenant="alpha", argv=("/bin/echo", "a command line long enough"))
        store.create(spec, actor="t", command_id=cid)
    engine.dispose()
    return built


def _shown_ids(text: str) -> list[str]:
    return re.findall(r"^│ ([0-9a-f-]{8,36}) +│", text, flags=re.MULTILINE)


def test_list_shows_unique_prefixes_a_narrow_terminal_does_not_cut(cli_env: Env) -> None:
    listed = run_cli(cli_env, "list", extra={"COLUMNS": "60"})
    assert listed.returncode == 0, listed.stderr
    assert all(len(line) <= 60 for line in listed.stdout.splitlines()), listed.stdout
    shown = _shown_ids(listed.stdout)
    assert sorted(shown) == sorted([IDS[0], IDS[1], "3f2a91c0-5b1f", "7d0c44e2"]), listed.stdout
    for prefix in shown:
        status = run_cli(cli_env, "status", prefix, "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["id"].startswith(prefix)


def test_list_json_keeps_full_ids(cli_env: Env) -> None:
    listed = run_cli(cli_env, "list", "--json", extra={"COLUMNS": "60"})
    assert sorted(r["id"] for r in json.loads(listed.stdout)) == sorted(IDS)


def _watch(env: Env, *args: str) -> tuple[int, str, str]:
    """`execq list --watch ARGS…` into a pipe, interrupted once it has refreshed twice."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "list", "--watch", "--interval", "0.2", *args],
        cwd=ROOT,
        env={**os.environ, **env.vars, "COLUMNS": "120"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 20
    marker = '"id"' if "--json" in args else "command(s)"
    while sum(marker in line for line in seen) < 2:
        assert time.monotonic() < deadline, "".join(seen)
        line = proc.stdout.readline()
        assert line, "".join(seen)
        seen.append(line)
    proc.send_signal(signal.SIGINT)
    rest, stderr = proc.communicate(timeout=30)
    return proc.returncode, "".join(seen) + rest, stderr


def test_watch_into_a_pipe_prints_the_table_each_interval_and_stops_on_ctrl_c(
    cli_env: Env,
) -> None:
    code, stdout, stderr = _watch(cli_env)
    assert (code, stderr) == (0, "")
    tables = [t for t in stdout.split("\n\n") if t.strip()]
    assert len(tables) >= 2 and all("command(s)" in t for t in tables[:2]), stdout
    assert sorted(_shown_ids(tables[0])) == sorted(_shown_ids(tables[1]))


def test_watch_with_json_prints_one_document_a_line(cli_env: Env) -> None:
    code, stdout, stderr = _watch(cli_env, "--json")
    assert (code, stderr) == (0, "")
    documents = [json.loads(line) for line in stdout.splitlines()]
    assert len(documents) >= 2
    assert all(sorted(r["id"] for r in d) == sorted(IDS) for d in documents)
