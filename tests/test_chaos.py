"""The chaos harness's short run in CI: faults injected against private Redis and PostgreSQL
servers (never the shared ones), and every end-of-scenario check must pass.

Four scenarios, 100 commands each: pool processes SIGKILLed, Redis restarted without
persistence, PostgreSQL stopped for 5 s, a worker SIGSTOPped for three leases then
continued (it must not record over the reaper's decision). Each also checks that the canary
secret reached the children and nothing else, and that no Redis subscription is left. The
defects the scenarios found are fixed and have fast tests of their own (listed in
docs/chaos.md). `make chaos` runs every scenario with 2,000 commands each.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need_private_servers

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("pool-kill", "redis-volatile", "pg-stop", "worker-stop")
COMMANDS = 100

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]


@pytest.mark.timeout(400)
def test_killed_and_stopped_workers_a_redis_restart_and_a_store_outage_lose_nothing(
    tmp_path: Path,
) -> None:
    need_private_servers("the chaos harness's private servers")
    out = tmp_path / "chaos.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "chaos", "--short", "--json",
            "--scenarios", ",".join(SCENARIOS),
            "--commands", str(COMMANDS), "--timeout", "350", "--out", str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=390,
        check=False,
    )  # fmt: skip
    assert out.exists(), done.stderr[-3000:]
    data = json.loads(out.read_text())
    reports = {r["scenario"]: r for r in data["reports"]}
    assert set(reports) == set(SCENARIOS), data
    for name, report in reports.items():
        assert report["problems"] == [], (name, report)
        assert report["accepted"] == COMMANDS, (name, report)
        assert (report["lost"], report["duplicated"], report["leaked"]) == (0, 0, 0), name
    assert data["passed"] and done.returncode == 0, done.stderr[-3000:]
