"""A worker's /metrics and /healthz, scraped over HTTP after real commands."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest

from producer.client import Producer
from producer.spec import CommandSpec
from producer.states import State
from tests.conftest import Env, start_worker
from tests.test_worker import Start, wait_for
from workers.embedded import EmbeddedRedis, _free_port

pytestmark = pytest.mark.slow


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_count_what_the_pool_processes_did(producer: Producer, workers: Start) -> None:
    port = _free_port()
    workers("alpha", concurrency=2, args=["--metrics-port", str(port)])
    specs = [
        CommandSpec(tenant="alpha", argv=["/bin/echo", "a"]),
        CommandSpec(tenant="alpha", argv=["/bin/echo", "b"]),
        CommandSpec(tenant="alpha", argv=["/bin/sh", "-c", "exit 3"]),
        CommandSpec(tenant="alpha", argv=["/bin/sleep", "5"], timeout_s=0.5),
    ]
    ids = [producer.submit(s).id for s in specs]
    states = [producer.wait(i, timeout=30).state for i in ids]
    assert states == [State.SUCCEEDED, State.SUCCEEDED, State.FAILED, State.FAILED]
    base = f"http://127.0.0.1:{port}"
    status, text = get(base + "/metrics")
    assert status == 200
    assert sample(text, "execq_commands_total", tenant="alpha", state="succeeded") == 2
    assert sample(text, "execq_commands_total", tenant="alpha", state="failed") == 2
    assert sample(text, "execq_limit_kills_total", tenant="alpha", kind="timeout") == 1
    assert sample(text, "execq_command_duration_seconds_count", tenant="alpha") == 4
    assert sample(text, "execq_queue_wait_seconds_count", tenant="alpha") == 4
    assert sample(text, "execq_running", tenant="alpha") == 0
    assert sample(text, "execq_queue_depth", tenant="alpha") == 0
    # Low-cardinality labels only: no command id or argv anywhere.
    assert not any(i in text for i in ids) and "/bin/echo" not in text
    status, body = get(base + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert get(base + "/nope")[0] == 404


def test_healthz_is_503_naming_the_broker_when_redis_is_down(
    make_env: Callable[..., Env], database_url: str
) -> None:
    server = EmbeddedRedis(record=False).start()
    env = make_env(database_url, server.url)
    port = _free_port()
    w = start_worker(env, "alpha", args=["--metrics-port", str(port)])
    try:
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        server.stop()

        def unhealthy() -> bool:
            return get(f"http://127.0.0.1:{port}/healthz")[0] == 503

        wait_for(unhealthy, 15, "/healthz to say 503")
        body = json.loads(get(f"http://127.0.0.1:{port}/healthz")[1])
        assert body["status"] == "unavailable"
        assert body["checks"]["broker"]["ok"] is False and body["checks"]["store"]["ok"] is True
    finally:
        w.stop()
        server.stop()
