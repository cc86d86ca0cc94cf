"""Live output over HTTP: server-sent events from a real worker through a live gateway, and
streams whose clients leave early leak nothing (tasks, Redis connections)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn

from bench.gateway import sse_events
from producer.redisconn import database_of
from producer.spec import CommandSpec
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.tenants import load_tenants
from producer.tokens import Tokens
from tests.conftest import PYTHON, Env, free_port, start_gateway, start_worker
from workers.gateway import create_app

TENANTS = f"""
tenants:
  alpha:
    concurrency: 1
    executables: [/bin/echo, /bin/sh, /bin/sleep, {PYTHON}]
    limits: {{timeout_s: 20, cpu_s: 10, memory_mb: 256, processes: 64, output_kb: 64,
              file_mb: 16}}
    http_rate: null
"""
TWO_LINES = ["/bin/sh", "-c", "echo first; sleep 1.5; echo second >&2; sleep 0.2; echo third"]


@pytest.fixture
def live_env(make_env: Callable[..., Env], tmp_path: Path, redis_url: str) -> Env:
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS)
    env = make_env(f"sqlite:///{tmp_path / 'live.db'}", redis_url, EXECQ_TENANTS_FILE=str(path))
    env.tenants = load_tenants(path)
    upgrade(make_engine(env.settings.database_url))
    return env


def token_for(env: Env) -> str:
    producer = env.producer()
    try:
        _, raw = Tokens(producer.store).create(tenant="alpha", scopes=["submit", "read"])
    finally:
        producer.close()
    return raw


def test_output_arrives_while_the_command_runs_and_resumes_exactly(live_env: Env) -> None:
    worker = start_worker(live_env, "alpha")
    gateway = start_gateway(live_env)
    auth = {"Authorization": f"Bearer {token_for(live_env)}"}
    try:
        with httpx.Client(base_url=gateway.url, headers=auth, timeout=30) as client:
            made = client.post("/v1/commands", json={"argv": TWO_LINES}).json()["id"]
            seen: list[tuple[float, dict[str, str]]] = []
            with client.stream("GET", f"/v1/commands/{made}/events") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                for event in sse_events(stream.iter_lines()):
                    seen.append((time.monotonic(), event))
                    if event.get("event") == "end":
                        break
            kinds = [e.get("event") for _, e in seen if "event" in e]
            assert kinds[-1] == "end" and "stdout" in kinds and "stderr" in kinds
            texts = [
                (e["event"], json.loads(e["data"])["text"])
                for _, e in seen
                if e.get("event") in ("stdout", "stderr")
            ]
            joined = "".join(t for _, t in texts)
            assert joined.replace("\n", "") == "firstsecondthird", texts
            first_at = next(t for t, e in seen if e.get("event") == "stdout")
            end_at = seen[-1][0]
            # "first" is printed 1.7 s before the command ends: it came live, not at the end.
            assert end_at - first_at > 1.0, (first_at, end_at)
            final = json.loads(seen[-1][1]["data"])
            assert final["state"] == "succeeded" and final["id"] == made
            # Resume after the first stdout event: exactly the events that followed it.
            resume_from = next(i for i, (_, e) in enumerate(seen) if e.get("event") == "stdout")
            after = seen[resume_from][1]["id"]
            rest = [e for _, e in seen[resume_from + 1 :] if "event" in e]
            with client.stream(
                "GET", f"/v1/commands/{made}/events", headers={"Last-Event-ID": after}
            ) as stream:
                again = [e for e in sse_events(stream.iter_lines()) if "event" in e]

            # Output: exactly the chunks that followed, once each. States may come coalesced
            # (a resume sees the state the store holds now), and it ends with the same record.
            def output(events: list[dict[str, str]]) -> list[tuple[str, str]]:
                return [
                    (e["event"], e["data"]) for e in events if e["event"] in ("stdout", "stderr")
                ]

            assert output(again) == output(rest)
            assert again[-1]["event"] == "end"
            assert json.loads(again[-1]["data"])["state"] == "succeeded"
            bad = client.get(f"/v1/commands/{made}/events", headers={"Last-Event-ID": "x"})
            assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["error"]
    finally:
        gateway.stop()
        worker.stop()


class Server:
    """The gateway app under uvicorn in a thread of this process, to count its tasks."""

    def __init__(self, app: object) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, port=self.port, log_level="warning", lifespan="on")  # type: ignore[arg-type]
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.server.serve())

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def tasks(self) -> int:
        assert self.loop is not None
        loop = self.loop
        return len([t for t in asyncio.all_tasks(loop) if not t.done()])


def test_200_clients_leaving_early_leak_no_task_or_redis_connection(
    live_env: Env, redis_url: str
) -> None:
    producer = live_env.producer()
    token = token_for(live_env)
    # A command that stays pending (no worker): its streams wait on Redis until closed.
    made = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sleep", "5"])).id
    probe = redis.Redis.from_url(redis_url)
    db = str(database_of(redis_url))

    def ours() -> list[dict[str, str]]:
        # Connections on this test's database: other runs on the same server are not ours.
        return [c for c in probe.client_list() if str(c.get("db")) == db]

    try:
        with Server(create_app(producer)) as server:
            url = f"http://127.0.0.1:{server.port}/v1/commands/{made}/events"

            async def one(client: httpx.AsyncClient) -> str:
                async with client.stream("GET", url) as stream:
                    async for line in stream.aiter_lines():
                        if line.startswith("event: state"):
                            return line
                return ""

            async def crowd() -> list[str]:
                limits = httpx.Limits(max_connections=250)
                headers = {"Authorization": f"Bearer {token}"}
                async with httpx.AsyncClient(limits=limits, headers=headers, timeout=30) as client:
                    return await asyncio.gather(*(one(client) for _ in range(200)))

            time.sleep(0.5)
            tasks_before = server.tasks()
            clients_before = len(ours())
            got = asyncio.run(crowd())
            assert got == ["event: state"] * 200
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                leaked_tasks = server.tasks() - tasks_before
                leaked_conns = len(ours()) - clients_before
                if leaked_tasks <= 0 and leaked_conns <= 0:
                    break
                time.sleep(0.2)
            assert leaked_tasks <= 0, f"{leaked_tasks} tasks left behind"
            assert leaked_conns <= 0, f"{leaked_conns} Redis connections left open"
    finally:
        probe.close()
        producer.close()
