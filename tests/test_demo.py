"""`execq demo` (what `make run` runs) ends every case as expected and stops what it started."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_the_demo_shows_every_case_and_cleans_up(tmp_path: Path, redis_url: str) -> None:
    before = {p.pid for p in psutil.process_iter()}
    env = {
        **os.environ,
        "EXECQ_BROKER_URL": redis_url,
        "EXECQ_DATABASE_URL": f"sqlite:///{tmp_path}/demo.db",
        "EXECQ_TENANTS_FILE": str(ROOT / "config" / "tenants.yaml"),
        "EXECQ_WORKDIR_ROOT": str(tmp_path / "work"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "demo", "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    cases = {c["case"]: c for c in json.loads(done.stdout)}
    assert {c: cases[c]["state"] for c in cases} == {
        "success": "succeeded",
        "failure": "reverted",
        "timeout": "failed",
        "policy": "rejected",
        "duplicate": "succeeded",
        "saga": "reverted",
    }
    # The failure keeps its own exit code; its compensation removed what it created.
    assert cases["failure"]["exit_code"] == 3
    assert cases["failure"]["note"].endswith("its file is gone")
    # The saga's third step failed: steps 2 and 1 were undone, in that order.
    assert cases["saga"]["note"].startswith("step 1 → step 2 → undo 2 → undo 1")
    assert cases["timeout"]["failure_reason"] == "timeout"
    assert cases["timeout"]["note"] == "tree killed, 0 process(es) left"
    assert cases["duplicate"]["note"] == "2nd submit: same id, nothing queued"
    leftovers = [
        p
        for p in psutil.process_iter(["pid", "cmdline"])
        if p.pid not in before and "workers.cli" in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []


def test_the_demo_table_ends_with_an_intact_audit_trail(tmp_path: Path, redis_url: str) -> None:
    env = {
        **os.environ,
        "EXECQ_BROKER_URL": redis_url,
        "EXECQ_DATABASE_URL": f"sqlite:///{tmp_path}/demo.db",
        "EXECQ_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
        "EXECQ_TENANTS_FILE": str(ROOT / "config" / "tenants.yaml"),
        "EXECQ_WORKDIR_ROOT": str(tmp_path / "work"),
        "COLUMNS": "200",
    }
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "demo"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Every phase, rollback and compensation of the cases, one chain per tenant used.
    found = re.search(r"audit trail: (\d+) events in 2 chain\(s\), every link intact", done.stdout)
    assert found is not None, done.stdout
    assert int(found.group(1)) >= 40
    assert "execq audit show" in done.stdout
