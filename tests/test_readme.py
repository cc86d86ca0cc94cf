"""The README's runnable examples, run as written: every fenced ```python block that follows a
`<!-- runnable -->` line runs in a subprocess against the shipped config/tenants.yaml, a real
Redis, a SQLite store made by `execq db upgrade` and a real `execq worker --tenant acme`, so
the example a newcomer copies is one that works."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Env, WorkerProc, start_worker

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUNNABLE = re.compile(r"^<!-- runnable -->\n```python\n(.*?)^```$", re.S | re.M)


def runnable_blocks() -> list[str]:
    blocks = RUNNABLE.findall(README.read_text())
    assert blocks, "README.md has no ```python block marked <!-- runnable -->"
    return blocks


@pytest.fixture
def acme(shipped_env: Env) -> Iterator[Env]:
    """The stack the tour starts, on the shipped tenants file: a store and a worker of acme."""
    worker: WorkerProc = start_worker(shipped_env, "acme")
    try:
        yield shipped_env
    finally:
        worker.stop()


def test_every_runnable_block_is_marked_before_a_python_fence() -> None:
    text = README.read_text()
    assert text.count("<!-- runnable -->") == len(runnable_blocks()), (
        "a <!-- runnable --> marker must be followed directly by a ```python block"
    )


def test_the_tour_says_how_to_stop_execq_up() -> None:
    readme = README.read_text()
    tour = readme.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    assert "execq up" in tour and "Ctrl-C" in tour


def test_the_readmes_runnable_python_runs_as_written(acme: Env) -> None:
    outputs = []
    for number, code in enumerate(runnable_blocks(), 1):
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, **acme.vars},
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, (
            f"README runnable block {number} failed (exit {result.returncode}):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
        outputs.append(result.stdout)
    # The tour's example waits for its greet action, prints what its comment shows, and
    # catches the refusal with the id it was recorded under.
    printed = "".join(outputs)
    assert printed.startswith("succeeded 0 hello web backend 2"), printed
    assert "['/bin/echo', 'hello web backend', '2']" in printed, printed
    assert re.search(r"^refused: [0-9a-f-]{36}$", printed, re.M), printed
