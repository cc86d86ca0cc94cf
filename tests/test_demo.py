"""`execq demo` (what `make run` runs) ends every case as expected and stops what it started."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

from producer.redisconn import shown_url
from tests.conftest import PG_ADMIN_URL, fresh_database

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _stack_env(tmp_path: Path, redis_url: str, database_url: str) -> dict[str, str]:
    """What `execq demo` and `execq up` run with here: the shipped tenants, our servers."""
    return {
        **os.environ,
        "EXECQ_BROKER_URL": redis_url,
        "EXECQ_DATABASE_URL": database_url,
        "EXECQ_TENANTS_FILE": str(ROOT / "config" / "tenants.yaml"),
        "EXECQ_WORKDIR_ROOT": str(tmp_path / "work"),
    }


def test_the_demo_shows_every_case_and_cleans_up(tmp_path: Path, redis_url: str) -> None:
    before = {p.pid for p in psutil.process_iter()}
    env = _stack_env(tmp_path, redis_url, f"sqlite:///{tmp_path}/demo.db")
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
        "action": "succeeded",
        "action-refused": "rejected",
        "saga": "reverted",
    }
    # The refused action says which parameter broke which rule.
    assert "param:path:under" in cases["action-refused"]["note"]
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


def _up(env: dict[str, str], cwd: Path, *, stdout: int, stderr: int) -> subprocess.Popen[str]:
    """`execq up --json` in a process group of its own (a Ctrl-C is sent to the group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "up", "--json"],
        env=env,
        cwd=cwd,
        stdout=stdout,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )


def test_up_shows_neither_server_password(tmp_path: Path, redis_url: str) -> None:
    # PostgreSQL here trusts local connections, so a password in the URL is accepted unused.
    secret = "up-s3cret-0a9b8c"
    with fresh_database("execq_up") as name:
        store = sa.make_url(PG_ADMIN_URL).set(database=name, password=secret)
        env = _stack_env(tmp_path, redis_url, store.render_as_string(hide_password=False))
        proc = _up(env, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            line = proc.stdout.readline() if ready else ""
            assert line, "execq up printed nothing in 120 s"
            info = json.loads(line)
            assert secret not in line
            assert info["database"] == store.render_as_string(hide_password=True)
            assert info["workers"]
        finally:
            # Ctrl-C at once: the workers (in sessions of their own) must stop with it.
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        assert secret not in err
        assert [pid for pid in info["workers"].values() if psutil.pid_exists(pid)] == []


def test_a_broker_url_is_shown_without_credentials_or_query() -> None:
    assert shown_url("redis://default:pw1@h:6379/0") == "redis://h:6379/0"
    assert shown_url("rediss://:pw2@h:6380/1?ssl_cert_reqs=required") == "rediss://h:6380/1"
    sentinels = (
        "sentinel://:pw3@a:26379;sentinel://:pw4@b:26379?master_name=m&sentinel_password=pw5"
    )
    assert shown_url(sentinels) == "sentinel://a:26379;sentinel://b:26379"


def test_ctrl_c_while_up_starts_stops_the_workers_it_started(
    tmp_path: Path, redis_url: str
) -> None:
    env = _stack_env(tmp_path, redis_url, f"sqlite:///{tmp_path}/up.db")
    proc = _up(env, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    up = psutil.Process(proc.pid)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while not started and time.monotonic() < deadline:  # workers spawned, not yet ready
            started = [c for c in up.children() if "worker" in " ".join(c.cmdline())]
            time.sleep(0.02)
        assert started, "execq up started no worker in 60 s"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    _, alive = psutil.wait_procs(started, timeout=30)
    assert alive == [], [p.cmdline() for p in alive]
