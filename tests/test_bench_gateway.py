"""`python -m bench.gateway` runs end to end on a tiny load and reports every number."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
# Not the suite's database (13): the bench's keys stay out of other tests' way.
BENCH_DB = 11


@pytest.mark.slow
@pytest.mark.redis
def test_the_gateway_bench_reports_rates_latencies_memory_and_live_output_delay(
    redis_server: str,
) -> None:
    url = urlsplit(redis_server)._replace(path=f"/{BENCH_DB}").geturl()
    flags = "--n 50 --repeat 1 --warmup 5 --sse-lines 10 --sse-commands 1 --sqlite --json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gateway", *flags.split(), "--redis-url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    doc = json.loads(done.stdout)

    assert doc["store"] == "sqlite"
    assert set(doc["rows"]) == {"celery", "api", "api-8", "http", "http-8"}
    for name, row in doc["rows"].items():
        assert row["errors"] == 0, name
        for key in ("submit_per_s", "p50_ms", "p99_ms"):
            assert row[key] > 0, (name, key)
    assert all(value > 0 for value in doc["ratios"].values()), doc["ratios"]
    assert set(doc["ratios"]) >= {"http_vs_api", "http_vs_celery"}
    assert doc["gateway_rss_mib"]["end"] > 0
    sse = doc["sse"]
    assert sse["lines_seen"] == sse["lines_printed"] == 10
    assert sse["final_states"] == ["succeeded"]
    assert sse["p50_ms"] > 0 and sse["p99_ms"] >= sse["p50_ms"]
    # Every key the run made in Redis is gone with it.
    client = redis.Redis.from_url(url)
    try:
        assert not list(client.scan_iter(match=f"{doc['namespace']}.*"))
    finally:
        client.close()
