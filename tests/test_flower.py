"""Flower on the execq broker: authenticated only, and its revokes reach the store."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from producer.client import Producer, SubmitResult
from producer.spec import CommandSpec
from producer.states import State
from tests.conftest import Env
from tests.test_worker import Start, alive, wait_for
from workers.embedded import _free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
AUTH = "admin:s3cret-flower"


def call(
    url: str, *, method: str = "GET", auth: str | None = None, data: bytes | None = None
) -> int:
    request = urllib.request.Request(url, method=method, data=data)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@contextmanager
def running_flower(env: Env, cwd: Path = ROOT) -> Iterator[str]:
    """`execq flower` with basic auth, started in `cwd`; yields its base URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "flower", "--port", str(port)],
        env={**os.environ, **env.vars, "FLOWER_BASIC_AUTH": AUTH},
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: call(base + "/healthcheck", auth=AUTH) == 200, 30, "Flower to listen")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        finally:
            # A Flower slow to stop still fails the test, but is not left running: its
            # remote-control broadcasts would reach the next tests on the same Redis.
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def flower(env: Env) -> Iterator[str]:
    with running_flower(env) as base:
        yield base


def busy_and_queued(
    producer: Producer, workers: Start, tmp_path: Path
) -> tuple[SubmitResult, SubmitResult, Path, Path]:
    """A one-process pool running a long command, and a command queued behind it."""
    workers("alpha", concurrency=1)
    pidfile = tmp_path / "pid"
    marker = tmp_path / "ran"
    busy = producer.submit(
        CommandSpec(tenant="alpha", argv=["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"])
    )
    queued = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sh", "-c", f"touch {marker}"]))
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 15, "the busy command")
    return busy, queued, pidfile, marker


def test_flower_refuses_to_start_without_authentication(env: Env) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "flower", "--port", str(_free_port())],
        env={k: v for k, v in {**os.environ, **env.vars}.items() if not k.startswith("FLOWER_")},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2 and "FLOWER_BASIC_AUTH" in done.stderr


def test_flower_refuses_unauthenticated_api_calls(flower: str) -> None:
    assert call(flower + "/api/workers") == 401
    assert call(flower + "/api/task/revoke/x", method="POST", data=b"") == 401
    assert call(flower + "/api/workers", auth=AUTH) == 200


def test_every_flower_path_needs_the_credentials(flower: str) -> None:
    pages = ["/metrics", "/healthcheck", "/api/workers", "/", "/static/css/flower.css"]
    for path in [*pages, "/favicon.ico", "/login", "/logout", "/no-such-page"]:
        assert call(flower + path) == 401, path
        assert call(flower + path, auth="admin:wrong") == 401, path
    assert call(flower + "/metrics", method="POST", data=b"") == 401
    for path in pages:
        assert call(flower + path, auth=AUTH) == 200, path
    assert call(flower + "/no-such-page", auth=AUTH) == 404


def test_a_flowerconfig_py_in_the_working_directory_is_never_loaded(
    env: Env, tmp_path: Path
) -> None:
    # Flower executes ./flowerconfig.py by default, and its settings beat the environment's.
    other_port, marker = _free_port(), tmp_path / "flowerconfig-ran"
    (tmp_path / "flowerconfig.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nbasic_auth = []\nauth = ''\nport = {other_port}\n"
    )
    with running_flower(env, cwd=tmp_path) as base:
        assert call(base + "/") == 401
        assert call(base + "/metrics") == 401
        assert call(base + "/api/workers") == 401
        assert call(base + "/api/workers", auth=AUTH) == 200
        assert call(f"http://127.0.0.1:{other_port}/healthcheck") == 0
    assert not marker.exists()


def test_flower_refuses_a_configuration_file_named_in_the_environment(env: Env) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "flower", "--port", str(_free_port())],
        env={**os.environ, **env.vars, "FLOWER_BASIC_AUTH": AUTH, "FLOWER_CONF": "/dev/null"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2 and "FLOWER_CONF" in done.stderr


def test_a_flower_revoke_reaches_the_store_and_terminate_kills_the_tree(
    producer: Producer, workers: Start, flower: str, tmp_path: Path
) -> None:
    busy, queued, pidfile, marker = busy_and_queued(producer, workers, tmp_path)
    assert producer.get(queued.id).state is State.PENDING
    # Revoke the queued command in Flower: it never runs.
    assert call(f"{flower}/api/task/revoke/{queued.id}", method="POST", auth=AUTH, data=b"") == 200
    wait_for(lambda: producer.get(queued.id).state is State.REVOKED, 15, "the store to say revoked")
    # Terminate the running one in Flower: its whole tree dies and the store says revoked.
    payload = int(pidfile.read_text())
    url = f"{flower}/api/task/revoke/{busy.id}"
    assert call(url, method="POST", auth=AUTH, data=b"terminate=true") == 200
    rec = producer.wait(busy.id, timeout=30)
    assert (rec.state, rec.failure_reason) == (State.REVOKED, "revoked")
    wait_for(lambda: not alive([payload]), 10, "the payload to die")
    assert not marker.exists()
    revokes = [e for e in producer.audit_events(command_id=queued.id) if e.phase == "revoke"]
    assert [e.operator for e in revokes] == ["flower"]


def test_flower_shows_the_task_by_name_with_secret_names_but_no_values(
    producer: Producer, workers: Start, flower: str
) -> None:

    # The worker starts with task events off (the default): Flower turns them on itself.
    workers("alpha")

    def tasks() -> dict:
        request = urllib.request.Request(f"{flower}/api/tasks")
        request.add_header("Authorization", "Basic " + base64.b64encode(AUTH.encode()).decode())
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read()))

    def probe_seen() -> bool:
        probe = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"]))
        producer.wait(probe.id, timeout=30)
        return probe.id in tasks()

    wait_for(probe_seen, 30, "Flower to turn the worker's task events on")
    secret = "fl0wer-canary-9d8e7f"
    r = producer.submit(
        CommandSpec(tenant="alpha", argv=["/bin/echo", "hi"], secrets={"API_TOKEN": secret})
    )
    assert producer.wait(r.id, timeout=30).state is State.SUCCEEDED
    wait_for(lambda: r.id in tasks(), 20, "Flower to know the task")
    task = tasks().get(r.id)
    assert task is not None and task["name"] == "execq.run"
    assert "API_TOKEN" in task["kwargs"] and secret not in json.dumps(task)


def test_a_flower_revoke_with_no_worker_running_still_reaches_the_store(
    producer: Producer, workers: Start, flower: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sh", "-c", f"touch {marker}"]))
    assert call(f"{flower}/api/task/revoke/{r.id}", method="POST", auth=AUTH, data=b"") == 200
    rec = producer.get(r.id)
    assert rec.state is State.REVOKED
    revoke = next(e for e in producer.audit_events(command_id=r.id) if e.phase == "revoke")
    assert revoke.operator == "flower"
    workers("alpha")  # it hears the message, and the store says the command is revoked
    other = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", "after"]))
    assert producer.wait(other.id, timeout=30).state is State.SUCCEEDED
    assert not marker.exists() and producer.get(r.id).state is State.REVOKED


def test_a_revoke_through_celery_remote_control_reaches_the_store_through_the_workers(
    producer: Producer, workers: Start, env: Env, tmp_path: Path
) -> None:
    from producer.broker import make_celery
    from producer.tenants import load_tenants

    busy, queued, _pidfile, marker = busy_and_queued(producer, workers, tmp_path)
    app = make_celery(env.settings, load_tenants(env.settings.tenants_file))
    app.control.revoke(queued.id)
    wait_for(lambda: producer.get(queued.id).state is State.REVOKED, 15, "the store to say revoked")
    app.control.revoke(busy.id, terminate=True)
    assert producer.wait(busy.id, timeout=30).state is State.REVOKED
    assert not marker.exists()
    revokes = [e for e in producer.audit_events(command_id=queued.id) if e.phase == "revoke"]
    assert [e.operator for e in revokes] == ["remote-control"]
    app.close()


def _task_events(env: Env, workers: Start, **extra: str) -> list[str]:
    """Types of the Celery task events published while one command runs."""
    client = redis.Redis.from_url(env.settings.broker_url)
    listener = client.pubsub()
    listener.psubscribe("*celeryev/task.*")
    try:
        workers("alpha", extra_env=extra)
        with env.producer() as producer:
            producer.wait(producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"])).id)
        seen, deadline = [], time.monotonic() + 3
        while time.monotonic() < deadline:
            message = listener.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is not None:
                # kombu's envelope; Celery buffers task events into lists (task.multi).
                body = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
                seen += [e["type"] for e in (body if isinstance(body, list) else [body])]
        return seen
    finally:
        listener.close()
        client.close()


def test_task_events_are_sent_from_the_start_when_configured(env: Env, workers: Start) -> None:
    seen = _task_events(env, workers, EXECQ_FLOWER_EVENTS="true")
    assert {"task-received", "task-started", "task-succeeded"} <= set(seen), seen


def test_by_default_a_worker_no_flower_watches_publishes_no_task_events(
    env: Env, workers: Start
) -> None:
    # They would cost a busy worker about 12 % of its throughput for nobody.
    assert _task_events(env, workers) == []


def test_with_signing_on_flowers_revokes_are_signed_and_accepted_by_workers(
    env: Env, workers: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "flower-signing-key-" + "f" * 20
    monkeypatch.setenv("EXECQ_SIGNING_KEY", key)
    env.vars["EXECQ_SIGNING_KEY"] = key
    with env.producer() as signed, running_flower(env) as flower:
        busy, queued, _pidfile, _marker = busy_and_queued(signed, workers, tmp_path)
        revoke = f"{flower}/api/task/revoke/{queued.id}"
        assert call(revoke, method="POST", auth=AUTH, data=b"") == 200
        url = f"{flower}/api/task/revoke/{busy.id}"
        assert call(url, method="POST", auth=AUTH, data=b"terminate=true") == 200
        assert signed.wait(busy.id, timeout=30).state is State.REVOKED
        assert signed.get(queued.id).state is State.REVOKED
        # The workers heard the broadcast and accepted its signature: nothing was refused.
        time.sleep(1)
        refused = [
            e
            for e in signed.audit_events(tenant="alpha")
            if e.phase == "revoke" and e.outcome == "refused"
        ]
        assert refused == []
