"""Redis over TLS with a password: the broker URL `rediss://:PASSWORD@host/db?...` reaches
every part of execq that talks to Redis (Celery, the cancel channel, the reaper's lock,
the submit-rate bucket)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from producer.spec import CommandSpec
from producer.states import State
from tests.conftest import CI, Env, start_worker
from workers.embedded import _free_port

PASSWORD = "tls-s3cret"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    """A throwaway redis-server that speaks only TLS and wants a password; its rediss:// URL."""
    if not (shutil.which("redis-server") and shutil.which("openssl")):
        if CI:
            pytest.fail("redis-server and openssl are needed for the TLS test")
        pytest.skip("redis-server or openssl missing")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    port = _free_port()
    server = subprocess.Popen(
        [
            "redis-server", "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
            "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url, socket_connect_timeout=1).ping()
                break
            except redis.RedisError:
                if server.poll() is not None or time.monotonic() > deadline:
                    if CI:
                        pytest.fail("redis-server without TLS support here")
                    pytest.skip("redis-server without TLS support")
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_commands_run_and_revoke_over_tls_with_a_password(
    tls_redis: str, make_env: Callable[..., Env], database_url: str
) -> None:
    tls_env = make_env(database_url, tls_redis)
    # Plain TCP or a wrong password is refused by this server: only the URL above works.
    with pytest.raises(redis.RedisError):
        redis.Redis.from_url(tls_redis.replace(PASSWORD, "wrong")).ping()
    worker = start_worker(tls_env, "alpha")
    try:
        with tls_env.producer() as producer:
            done = producer.wait(
                producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", "over tls"])).id,
                timeout=30,
            )
            assert (done.state, (done.stdout or "").strip()) == (State.SUCCEEDED, "over tls")
            # The cancel channel (pub/sub) goes over the same TLS connection settings.
            slow = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sleep", "30"]))
            deadline = time.monotonic() + 15
            while producer.get(slow.id).state is not State.RUNNING:
                assert time.monotonic() < deadline, "the command never started"
                time.sleep(0.05)
            producer.revoke(slow.id, terminate=True, operator="test")
            assert producer.wait(slow.id, timeout=15).state is State.REVOKED
    finally:
        worker.stop()
    # Celery itself connected over TLS (the password masked in its line).
    assert "Connected to rediss://:**@127.0.0.1" in worker.output()
