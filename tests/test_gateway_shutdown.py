"""A gateway asked to stop while an event stream is open stops within its grace period.

An event stream ends only with its command, and a resume after `end` waits until the command
changes again: before the bound, one such stream kept a SIGTERMed gateway up indefinitely
(found by the `gateway-kill` chaos scenario), until a service manager SIGKILLed it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import uvicorn

from producer.settings import GatewaySettings
from producer.spec import CommandSpec
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.tokens import Tokens
from tests.conftest import Env, free_port
from workers.cli_gateway import SHUTDOWN_GRACE_S, uvicorn_config
from workers.gateway import create_app


def test_an_open_event_stream_does_not_keep_a_stopping_gateway_up(
    make_env: Callable[..., Env], tmp_path: Path, redis_url: str
) -> None:
    env = make_env(f"sqlite:///{tmp_path / 'gw.db'}", redis_url)
    upgrade(make_engine(env.settings.database_url))
    producer = env.producer()
    _, token = Tokens(producer.store).create(tenant="alpha", scopes=["submit", "read"])
    # No worker: the command stays pending, and its stream open.
    made = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", "never"])).id
    options = GatewaySettings(port=free_port(), access_log=False)
    server = uvicorn.Server(uvicorn_config(options, app=create_app(producer, close_producer=True)))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)

    seen: list[str] = []

    def follow() -> None:
        url = f"http://127.0.0.1:{options.port}/v1/commands/{made}/events"
        headers = {"Authorization": f"Bearer {token}"}
        try:
            with httpx.stream("GET", url, headers=headers, timeout=60) as stream:
                for line in stream.iter_lines():
                    seen.append(line)
        except httpx.TransportError:
            seen.append("cut")

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    while not any(line.startswith("event: state") for line in seen):
        assert time.monotonic() < deadline, f"no state event: {seen}"
        time.sleep(0.02)

    asked = time.monotonic()
    server.should_exit = True  # what uvicorn's SIGTERM and SIGINT handlers do
    thread.join(SHUTDOWN_GRACE_S + 10)
    assert not thread.is_alive(), "the gateway still serves its open stream"
    assert time.monotonic() - asked < SHUTDOWN_GRACE_S + 5
    reader.join(10)
    # The client saw its stream end (and may resume elsewhere with Last-Event-ID).
    assert not reader.is_alive() and seen[-1] == "cut", seen[-3:]
