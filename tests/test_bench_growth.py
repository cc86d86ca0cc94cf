"""`python -m bench.growth --quick` runs end to end on tiny numbers and reports every tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_URL

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_the_growth_bench_reports_every_tier_and_draws_its_charts(
    redis_url: str, pg_server: str, tmp_path: Path
) -> None:
    # pg_server: PostgreSQL answers (else skip, or fail in CI); the bench makes its own DBs.
    out, charts = tmp_path / "growth.json", tmp_path / "img"
    flags = ["--redis-url", redis_url, "--pg-url", PG_ADMIN_URL, "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.growth", "--quick", *flags, "--charts", str(charts)],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    doc = json.loads(out.read_text())

    setups = {(r["system"], r["processes"], r["concurrency"]) for r in doc["concurrency"]}
    assert setups == {
        *((s, 1, c) for s in ("execq", "celery") for c in (1, 2, 4)),
        ("execq", 2, 2),
        ("celery", 2, 2),
    }
    for row in doc["concurrency"]:
        assert row["ok"] == "1/1", row
        assert row["e2e_per_s"] > 0 and row["paced_p99_ms"] > 0, row

    assert {(r["store_rows"], r["pending"]) for r in doc["claims"]} == {
        (rows, pending) for rows in (0, 1000) for pending in (0, 50, 200)
    }
    for row in doc["claims"]:
        for key in ("claim_p50_ms", "claim_p99_ms", "finish_p50_ms", "finish_p99_ms"):
            assert row[key] > 0, (row, key)

    assert [r["events"] for r in doc["audit"]] == [100, 500]
    assert all(r["verify_s"] > 0 for r in doc["audit"])

    assert [r["backlog"] for r in doc["sweeps"]] == [0, 50, 600]
    for row in doc["sweeps"]:
        assert row["expired_leases_ms"] > 0 and row["unpublished_ms"] > 0 and row["pass_ms"] > 0
    # A pass takes at most its limits' worth (100 leases, 500 publishes), whatever the backlog.
    last = doc["sweeps"][-1]
    assert (last["pass_lost"], last["pass_published"]) == (100, 500)

    names = {"concurrency", "claim-latency", "audit-verify", "sweeps"}
    assert {p.name for p in charts.iterdir()} == {f"growth-{n}.png" for n in names}
    for png in charts.iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "# claim and finish latency" in done.stdout
