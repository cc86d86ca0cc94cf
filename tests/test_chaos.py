"""The chaos harness's short run in CI: faults injected against private Redis and PostgreSQL
servers (never the shared ones), and every end-of-scenario check must pass.

pool-kill and worker-kill are left out: they find private directories that execq leaves in
the workdir root when a pool process dies mid-command (see `make chaos`); pg-stop is left out
because a store outage longer than the lease turns live workers' commands into worker_lost.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path("/usr/lib/postgresql/15/bin/initdb")

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]


def _servers_missing() -> str | None:
    if not Path("/usr/bin/redis-server").is_file():
        return "/usr/bin/redis-server"
    if not PG_BIN.is_file() and not shutil.which("initdb", path="/usr/local/bin"):
        return "initdb"
    if os.geteuid() != 0:
        return "root (initdb runs as the postgres user through runuser)"
    return None


@pytest.mark.timeout(150)
def test_a_redis_restart_without_persistence_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    missing = _servers_missing()
    if missing:
        pytest.skip(f"the chaos harness needs {missing}")
    out = tmp_path / "chaos.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "chaos", "--short", "--json",
            "--scenarios", "redis-volatile",
            "--commands", "100", "--timeout", "110", "--out", str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )  # fmt: skip
    assert out.exists(), done.stderr[-3000:]
    data = json.loads(out.read_text())
    (report,) = data["reports"]
    assert report["problems"] == [], report
    assert report["accepted"] == 100
    assert (report["lost"], report["duplicated"], report["leaked"]) == (0, 0, 0)
    assert data["passed"] and done.returncode == 0, done.stderr[-3000:]
