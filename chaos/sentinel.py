"""Redis behind Sentinel for the chaos runs: a primary, a replica and three sentinels of our
own on loopback, and the fault that matters there, the primary killed so that the sentinels
promote the replica while commands stream in.

The set stands in for the single `RedisServer` a scenario normally gets: its `url` is
execq's `sentinel://…?master_name=…` broker URL, `client()` answers with the current primary,
`crash()` kills the primary (a failover follows), `start()` brings a killed node back as a
replica of the current primary, and `close()` stops and removes everything.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from chaos.servers import REDIS_BIN, RedisServer, ServerError, free_port

if TYPE_CHECKING:
    from chaos.scenarios import Run

MASTER_NAME = "chaos"
DOWN_AFTER_MS = 1000  # the sentinels call the primary down after 1 s without an answer
FAILOVER_TIMEOUT_MS = 5000  # a failover that stalls is tried again after this
HOST = "127.0.0.1"


@dataclass
class Node:
    """One redis-server of the set (a data node or a sentinel) on a port of its own."""

    name: str
    port: int
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=1, socket_connect_timeout=1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.proc = None


def _replication(node: Node, key: str) -> object:
    """A field of the node's INFO replication (`role`, `master_link_status`); None while it
    does not answer."""
    client = node.client()
    try:
        return client.info("replication").get(key)
    except redis.RedisError:
        return None
    finally:
        client.close()


class SentinelSet(RedisServer):
    """A primary, a replica (`replicaof`) and `sentinels` sentinels (quorum: a majority),
    each a redis-server in this set's temp dir. `aof` gives the data nodes an append-only
    file fsynced every second, as for `RedisServer`."""

    def __init__(self, aof: bool = False, sentinels: int = 3) -> None:
        self.aof = aof
        self.root = Path(tempfile.mkdtemp(prefix="execq-chaos-sentinel-"))
        self.quorum = sentinels // 2 + 1
        self.data = [self._data_node("a"), self._data_node("b")]
        self.sentinels = [Node(f"sentinel-{i}", free_port(), []) for i in range(sentinels)]
        self.port = self.data[0].port
        addresses = ";".join(f"sentinel://{HOST}:{s.port}/0" for s in self.sentinels)
        self.url = f"{addresses}?master_name={MASTER_NAME}"
        self.proc = None
        self.killed: list[Node] = []
        self.started = False

    def _data_node(self, name: str) -> Node:
        port = free_port()
        directory = self.root / name
        directory.mkdir()
        argv = [
            REDIS_BIN,
            "--port", str(port),
            "--bind", HOST,
            "--dir", str(directory),
            "--save", "",
            "--daemonize", "no",
            "--appendonly", "yes" if self.aof else "no",
            "--appendfsync", "everysec",
            # The default waits 5 s for more replicas before a full sync starts.
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        return Node(name, port, argv)

    # --- processes

    def _spawn(self, node: Node, extra: list[str]) -> None:
        with (self.root / f"{node.name}.log").open("ab") as log:
            node.proc = subprocess.Popen(
                [*node.argv, *extra],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.root,
            )

    def _wait(self, what: str, check: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            for node in (*self.data, *self.sentinels):
                if node.proc is not None and node.proc.poll() is not None:
                    raise ServerError(f"{node.name} exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"timed out waiting for {what}: {self.log_tail()}")
            time.sleep(0.05)

    def _sentinel_conf(self, sentinel: Node, primary: Node) -> Path:
        directory = self.root / sentinel.name
        directory.mkdir(exist_ok=True)
        conf = directory / "sentinel.conf"
        # The sentinel rewrites this file as it learns the set: one file per sentinel.
        conf.write_text(
            f"port {sentinel.port}\nbind {HOST}\ndir {directory}\ndaemonize no\n"
            f"sentinel monitor {MASTER_NAME} {HOST} {primary.port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        return conf

    def start(self, timeout_s: float = 30.0) -> None:
        """The first time, the whole set; after `crash()`, the killed node again, as a replica
        of the current primary (what an operator does with a repaired host)."""
        if not self.started:
            self._start_set(timeout_s)
            self.started = True
            return
        primary = self.primary_node()
        for node in self.killed:
            self._spawn(node, ["--replicaof", HOST, str(primary.port)])
        self.killed = []
        self.wait_replicas_linked(timeout_s)

    def _start_set(self, timeout_s: float) -> None:
        primary, replica = self.data
        self._spawn(primary, [])
        self._spawn(replica, ["--replicaof", HOST, str(primary.port)])
        self.wait_replicas_linked(timeout_s)
        # Started once the replica is attached, so the sentinels' first INFO lists it.
        for sentinel in self.sentinels:
            conf = self._sentinel_conf(sentinel, primary)
            sentinel.argv = [REDIS_BIN, str(conf), "--sentinel"]
            self._spawn(sentinel, [])
        self._wait("the sentinels to know the replica and each other", self._ready, timeout_s)

    def _ready(self) -> bool:
        """Every sentinel sees the replica and the other sentinels: only then can they
        agree on a failover."""
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                master: Any = client.sentinel_master(MASTER_NAME)
                replicas: Any = client.sentinel_slaves(MASTER_NAME)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if int(master.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                return False
            if not any(r.get("flags") == "slave" for r in replicas):
                return False
        return True

    def wait_replicas_linked(self, timeout_s: float = 30.0) -> None:
        """Until every live node but the primary is a replica in sync with it."""

        def linked() -> bool:
            try:
                primary = self.primary_node()
            except ServerError:
                return False
            others = [n for n in self.data if n is not primary and n.alive()]
            if not all(_replication(n, "master_link_status") == "up" for n in others):
                return False
            # and the sentinels see them healthy again: only such a replica can be promoted
            return all(self._sentinels_see_replica(n.port) for n in others)

        self._wait("the replicas to sync", linked, timeout_s)

    def _sentinels_see_replica(self, port: int) -> bool:
        for sentinel in [s for s in self.sentinels if s.alive()]:
            client = sentinel.client()
            try:
                replicas: Any = client.sentinel_slaves(MASTER_NAME)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if not any(int(r["port"]) == port and r.get("flags") == "slave" for r in replicas):
                return False
        return True

    def replica_clients(self) -> list[str]:
        """Connections to the replicas other than the sentinels' and the replication link:
        an execq client there reads stale data and its subscriptions never hear the
        primary's messages."""
        primary = self.primary_node()
        found: list[str] = []
        for node in self.data:
            if node is primary or not node.alive():
                continue
            client = node.client()
            try:
                entries: Any = client.client_list()
            except redis.RedisError:
                continue
            finally:
                client.close()
            for c in entries:
                if (
                    self.own_client(c)
                    or "M" in str(c.get("flags"))
                    or c.get("cmd") == "client|list"
                ):
                    continue
                found.append(
                    f"{node.name}: {c.get('addr')} {c.get('name') or ''} cmd={c.get('cmd')}"
                )
        return found

    # --- who is the primary

    def reported_primary(self) -> int | None:
        """The primary's port as a majority of the sentinels report it (None: no majority or
        no answer, e.g. mid-failover); before the sentinels run, the first data node."""
        if not any(s.alive() for s in self.sentinels):
            return self.data[0].port if self.data[0].alive() else None
        votes: dict[int, int] = {}
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                addr = client.sentinel_get_master_addr_by_name(MASTER_NAME)
            except redis.RedisError:
                continue
            finally:
                client.close()
            if isinstance(addr, tuple | list) and len(addr) == 2:
                port = int(addr[1])
                votes[port] = votes.get(port, 0) + 1
        best = max(votes.items(), key=lambda kv: kv[1], default=None)
        return best[0] if best is not None and best[1] >= self.quorum else None

    def primary_node(self) -> Node:
        """The data node that the sentinels name and that says it is a primary."""
        port = self.reported_primary()
        for node in self.data:
            if node.port == port and node.alive() and _replication(node, "role") == "master":
                return node
        raise ServerError(f"no primary right now (sentinels report port {port})")

    def wait_failover(self, old_port: int, timeout_s: float = 60.0) -> Node:
        """Until the sentinels name another node than `old_port`, and it acts as primary."""
        found: list[Node] = []

        def moved() -> bool:
            with contextlib.suppress(ServerError):
                node = self.primary_node()
                if node.port != old_port:
                    found.append(node)
                    return True
            return False

        self._wait("the sentinels to promote a replica", moved, timeout_s)
        return found[0]

    # --- RedisServer's interface

    def client(self) -> redis.Redis:
        """A plain client of the current primary (closing it closes its connections)."""
        node = self.primary_node()
        return redis.Redis(host=HOST, port=node.port, socket_timeout=2)

    def own_client(self, info: dict[str, Any]) -> bool:
        """The sentinels' own links: each subscribes to its primary's `__sentinel__:hello`,
        named `sentinel-<run id>-pubsub` (and `-cmd`)."""
        return str(info.get("name") or "").startswith("sentinel-")

    def crash(self) -> None:
        """SIGKILL the current primary: the sentinels promote the replica within seconds."""
        node = self.primary_node()
        node.kill()
        self.killed.append(node)

    def log_tail(self) -> str:
        tails = []
        for log in sorted(self.root.glob("*.log")):
            with contextlib.suppress(OSError):
                tails.append(f"[{log.stem}] {log.read_text(errors='replace')[-600:]}")
        return "\n".join(tails)

    def close(self) -> None:
        for node in (*self.sentinels, *self.data):
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def sentinel_set(aof: bool) -> RedisServer:
    """The scenario's broker: three sentinels (quorum two) watching a primary and a replica."""
    return SentinelSet(aof, sentinels=3)


def fail_over(run: Run) -> None:
    """SIGKILL the primary at 30 % of the stream; once the sentinels have promoted the
    replica, the old primary comes back as the new one's replica (the full run does it
    twice, so the second failover goes back to the first node)."""
    rds = run.redis
    if not isinstance(rds, SentinelSet):
        raise TypeError("fail_over needs the scenario's broker to be a SentinelSet")
    for fraction in (0.3,) if run.opts.short else (0.3, 0.6):
        run.at_fraction(fraction)
        old = rds.primary_node()
        t0 = time.monotonic()
        rds.crash()
        run.faults.note(f"primary {old.name} (:{old.port}) killed")
        new = rds.wait_failover(old.port)
        run.faults.note(
            f"sentinels promoted {new.name} (:{new.port}) in {time.monotonic() - t0:.1f} s"
        )
        rds.start()
        run.faults.end = time.time()
        run.faults.note(f"{old.name} back as a replica of {new.name}")
    # every client follows the sentinels to the primary: none is left on a replica
    run.stream.join(max(0.0, run.stream.deadline - time.monotonic()))
    run.faults.problems.extend(f"client on a replica: {c}" for c in rds.replica_clients())
