"""Schemathesis against a live `execq gateway`: every operation of /openapi.json, generated
valid and invalid requests, zero server errors and zero answers outside the schema."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.tokens import Tokens
from tests.conftest import Env, start_gateway

CHECKS = ",".join(
    [
        "not_a_server_error",
        "response_schema_conformance",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
    ]
)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    make_env: Callable[..., Env], tmp_path: Path, redis_url: str
) -> None:
    env = make_env(f"sqlite:///{tmp_path / 'schema.db'}", redis_url)
    upgrade(make_engine(env.settings.database_url))
    producer = env.producer()
    _, token = Tokens(producer.store).create(
        tenant="alpha", scopes=["submit", "read", "operate"], name="schemathesis"
    )
    producer.close()
    gateway = start_gateway(env)
    try:
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                f"{gateway.url}/openapi.json",
                "--header",
                f"Authorization: Bearer {token}",
                "--checks",
                CHECKS,
                "--max-examples",
                "15",
                "--request-timeout",
                "5",
                "--seed",
                "20261206",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=tmp_path,  # where schemathesis keeps its reports
        )
    finally:
        gateway.stop()
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "passed" in run.stdout and "failure" not in run.stdout.split("SUMMARY")[-1], report
    assert "unexpected" not in gateway.output(), gateway.output()[-3000:]


def test_several_gateway_processes_serve_one_port_and_stop_together(
    make_env: Callable[..., Env], tmp_path: Path, redis_url: str
) -> None:
    env = make_env(f"sqlite:///{tmp_path / 'multi.db'}", redis_url)
    upgrade(make_engine(env.settings.database_url))
    producer = env.producer()
    _, token = Tokens(producer.store).create(tenant="alpha", scopes=["submit", "read"])
    producer.close()
    gateway = start_gateway(env, "--workers", "2", "--no-access-log")
    try:
        import httpx
        import psutil

        children = psutil.Process(gateway.proc.pid).children(recursive=True)
        assert len([c for c in children if "python" in c.name()]) >= 2
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=gateway.url, headers=auth, timeout=20) as client:
            made = {
                client.post("/v1/commands", json={"argv": ["/bin/echo", str(i)]}).json()["id"]
                for i in range(20)
            }
            assert len(made) == 20
            listed = client.get("/v1/commands?limit=50").json()["items"]
            assert made <= {item["id"] for item in listed}
        assert "2 processes" in gateway.output()
    finally:
        assert gateway.stop() == 0, gateway.output()[-2000:]
    # Every child ends; multiprocessing's resource tracker may take a moment after the parent.
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not [c for c in alive if c.status() != psutil.STATUS_ZOMBIE]


def test_a_bad_gateway_setting_stops_it_naming_the_variable(
    make_env: Callable[..., Env], tmp_path: Path, redis_url: str
) -> None:
    env = make_env(f"sqlite:///{tmp_path / 'bad.db'}", redis_url)
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "gateway"],
        env={**os.environ, **env.vars, "EXECQ_GATEWAY_WORKERS": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "EXECQ_GATEWAY_WORKERS" in done.stderr
