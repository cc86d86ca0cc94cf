"""Redis behind Sentinel: with `EXECQ_BROKER_URL=sentinel://…?master_name=…` Celery, the
cancel channel and execq's own keys all reach the current master, and keep working after
the sentinels promote a replica."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from producer.errors import ConfigError
from producer.redisconn import parse_sentinel_url, redis_client
from producer.revocation import cancel_channel
from producer.settings import Settings
from producer.spec import CommandSpec
from producer.states import State
from tests.conftest import CI, Env, start_worker, wait_for
from workers.embedded import _free_port

MASTER_PASSWORD = "master-s3cret"
SENTINEL_PASSWORD = "sentinel-s3cret"
MASTER_NAME = "execq-test"


@dataclass
class SentinelCluster:
    """A master, one replica and one sentinel, each its own redis-server process."""

    tmp: Path
    master_port: int = 0
    replica_port: int = 0
    sentinel_port: int = 0
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return (
            f"sentinel://:{MASTER_PASSWORD}@127.0.0.1:{self.sentinel_port}/0"
            f"?master_name={MASTER_NAME}&sentinel_password={SENTINEL_PASSWORD}"
        )

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=MASTER_PASSWORD, socket_timeout=2)

    def sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.sentinel_port, password=SENTINEL_PASSWORD, socket_timeout=2)

    def reported_master_port(self) -> int | None:
        try:
            addr = self.sentinel().sentinel_get_master_addr_by_name(MASTER_NAME)
        except redis.RedisError:
            return None
        return int(addr[1]) if isinstance(addr, tuple) else None

    def start(self) -> SentinelCluster:
        self.master_port, self.replica_port, self.sentinel_port = (_free_port() for _ in range(3))
        for port, extra in (
            (self.master_port, []),
            (self.replica_port, ["--replicaof", "127.0.0.1", str(self.master_port)]),
        ):
            self._spawn(
                port,
                [
                    "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                    "--requirepass", MASTER_PASSWORD, "--masterauth", MASTER_PASSWORD,
                    "--save", "", "--appendonly", "no", "--dir", str(self.tmp),
                    # The default waits 5 s for more replicas before the first full sync.
                    "--repl-diskless-sync-delay", "0", *extra,
                ],
            )  # fmt: skip
        replica = self.node(self.replica_port)
        wait_for(
            lambda: _answers(lambda: replica.info("replication")["master_link_status"] == "up"),
            10,
            "the replica to sync with the master",
        )
        # Started after the replica is attached, so the sentinel's first INFO already lists it.
        conf = self.tmp / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.tmp}\n"
            f"requirepass {SENTINEL_PASSWORD}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel auth-pass {MASTER_NAME} {MASTER_PASSWORD}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
            f"sentinel failover-timeout {MASTER_NAME} 5000\n"
        )
        self._spawn(self.sentinel_port, ["redis-server", str(conf), "--sentinel"])
        sentinel = self.sentinel()

        def replica_ready() -> bool:
            replicas = sentinel.sentinel_slaves(MASTER_NAME)
            assert isinstance(replicas, list)
            # Until the sentinel has its own link to the replica it would not promote it.
            return any(r["port"] == self.replica_port and r["flags"] == "slave" for r in replicas)

        wait_for(lambda: _answers(replica_ready), 15, "the sentinel to reach the replica")
        return self

    def _spawn(self, port: int, argv: list[str]) -> None:
        log = (self.tmp / f"redis-{port}.log").open("wb")
        self.procs[port] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def kill(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _answers(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except redis.RedisError:
        return False


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    if shutil.which("redis-server") is None:
        if CI:
            pytest.fail("redis-server is needed for the Sentinel tests")
        pytest.skip("redis-server missing")
    work = tmp_path / "sentinel"
    work.mkdir()
    c = SentinelCluster(work)
    try:
        yield c.start()
    finally:
        c.stop()
        # Shown by pytest only when the test failed: what Redis and the sentinel did.
        for log in sorted(work.glob("redis-*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")


def test_a_sentinel_url_without_master_name_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="needs \\?master_name=NAME"):
        Settings(broker_url="sentinel://127.0.0.1:26379")
    with pytest.raises(ConfigError, match="unknown sentinel URL parameter\\(s\\) db"):
        parse_sentinel_url("sentinel://h1:26379?master_name=m&db=3")
    with pytest.raises(ConfigError, match="different passwords") as err:
        parse_sentinel_url("sentinel://:one@h1:26379;sentinel://:two@h2:26379?master_name=m")
    assert "one" not in str(err.value) and "two" not in str(err.value)


def test_every_address_of_a_sentinel_url_carries_the_password_for_kombu() -> None:
    target = parse_sentinel_url(
        "sentinel://:p%40ss@h1:26379/3;sentinel://h2?master_name=m&sentinel_password=sp"
    )
    assert target.sentinels == (("h1", 26379), ("h2", 26379))
    assert (target.password, target.db, target.sentinel_password) == ("p@ss", 3, "sp")
    assert target.kombu_url() == "sentinel://:p%40ss@h1:26379/3;sentinel://:p%40ss@h2:26379/3"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_commands_run_and_revoke_through_sentinel(
    cluster: SentinelCluster, make_env: Callable[..., Env], database_url: str
) -> None:
    # A long lease: renewals (every 20 s) cannot be what delivers the revoke below.
    env = make_env(database_url, cluster.url, EXECQ_LEASE_S="60")
    # The sentinel itself refuses clients without its own password.
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=cluster.sentinel_port).sentinel_masters()
    worker = start_worker(env, "alpha")
    try:
        with env.producer() as producer:
            done = producer.wait(
                producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", "via sentinel"])).id,
                timeout=30,
            )
            assert (done.state, (done.stdout or "").strip()) == (State.SUCCEEDED, "via sentinel")

            slow = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sleep", "30"]))
            wait_for(lambda: producer.get(slow.id).state is State.RUNNING, 15, "sleep to start")
            master = cluster.node(cluster.master_port)
            # The running pool process listens on the cancel channel of the real master.
            channel = cancel_channel(env.settings, "alpha", env.settings.broker_url).encode()
            wait_for(
                lambda: dict(master.pubsub_numsub(channel))[channel],
                5,
                "a cancel-channel subscriber on the master",
            )
            asked = time.monotonic()
            producer.revoke(slow.id, terminate=True, operator="test")
            rec = producer.wait(slow.id, timeout=15)
            assert rec.state is State.REVOKED
            assert time.monotonic() - asked < 10, "the revoke waited for a lease renewal"
        # What /healthz and every direct client get: the master, found through the sentinel.
        health = redis_client(env.settings.broker_url, socket_connect_timeout=2)
        assert health.ping()
        assert isinstance(health.connection_pool, SentinelConnectionPool)
        master_addr = health.connection_pool.get_master_address()  # type: ignore[no-untyped-call]
        assert master_addr[1] == cluster.master_port
        health.close()
    finally:
        worker.stop()
        print(worker.output()[-6000:])
    out = worker.output()
    assert f"Connected to sentinel://:**@127.0.0.1:{cluster.sentinel_port}/0" in out
    assert MASTER_PASSWORD not in out and SENTINEL_PASSWORD not in out


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_new_command_runs_after_the_sentinel_promotes_the_replica(
    cluster: SentinelCluster, make_env: Callable[..., Env], database_url: str
) -> None:
    env = make_env(database_url, cluster.url)
    worker = start_worker(env, "alpha")
    try:
        with env.producer() as producer:
            first = producer.wait(
                producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", "before"])).id,
                timeout=30,
            )
            assert first.state is State.SUCCEEDED
            cluster.kill(cluster.master_port)
            wait_for(
                lambda: cluster.reported_master_port() == cluster.replica_port,
                20,
                "the sentinel to promote the replica",
            )
            after = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", "after"]))
            rec = producer.wait(after.id, timeout=30)
            assert (rec.state, (rec.stdout or "").strip()) == (State.SUCCEEDED, "after")
            # Still one attempt: the failover re-ran nothing.
            assert producer.get(first.id).attempts == 1 and rec.attempts == 1
        # The reaper's long-lived client moved too: it takes its turns on the new master.
        promoted = cluster.node(cluster.replica_port)
        promoted.delete("execq.reaper.alpha")
        wait_for(lambda: promoted.exists("execq.reaper.alpha"), 10, "a reaper turn there")
        # The worker outlived the failover instead of exiting with its broker.
        assert worker.proc.poll() is None
    finally:
        with contextlib.suppress(Exception):
            worker.stop()
        print(worker.output()[-6000:])
