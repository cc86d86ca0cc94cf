"""What a worker holds: its configuration (main process) and per-process resources (pool).

Resources that must not cross fork() — database connections, the sandbox's cgroups, the
lease thread — are made lazily in the process that uses them, and reset after fork.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from sqlalchemy import text

from producer import telemetry
from producer.audit.trail import Trail
from producer.broker import Publisher, make_celery, queue_key
from producer.redisconn import redis_client
from producer.revocation import cancel_channel
from producer.sealing import Sealer
from producer.settings import Settings
from producer.signing import Signer
from producer.store.db import make_engine
from producer.store.repository import Store
from producer.tenants import Tenant, TenantsFile
from workers.lease import LeaseKeeper
from workers.live import LiveOutput
from workers.metrics import Health
from workers.pipeline import Pipeline, workdir_root
from workers.sandbox import Sandbox

log = logging.getLogger("execq.worker")


@dataclass(frozen=True)
class WorkerConfig:
    """Validated once at start, passed to everything the worker builds."""

    settings: Settings
    tenants: TenantsFile
    tenant: Tenant
    broker_url: str
    concurrency: int
    # None: messages are not signed (refused in prod at start, see `execq worker`).
    signer: Signer | None = None
    metrics_port: int | None = None
    # Holds this tenant's key only: what opens (and seals) its messages' secret values.
    sealer: Sealer | None = None

    @property
    def hostname(self) -> str:
        """The Celery node name: one per tenant per host (and per process, for tests)."""
        return f"{self.tenant.name}.{os.getpid()}@{socket.gethostname()}"


class Runtime:
    """Per-process resources, created on first use in the process that uses them."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._pid = os.getpid()
        self._store: Store | None = None
        self._pipeline: Pipeline | None = None
        self._sandbox: Sandbox | None = None
        self._lease: LeaseKeeper | None = None
        self._publisher: Publisher | None = None
        self._live: LiveOutput | None = None

    @property
    def worker_id(self) -> str:
        """Who holds a lease: this process on this host."""
        return f"{self.config.tenant.name}@{socket.gethostname()}:{os.getpid()}"

    @property
    def store(self) -> Store:
        """This process's store (its own connection pool)."""
        self._check_fork()
        if self._store is None:
            self._store = Store(make_engine(self.config.settings.database_url, pool_size=2))
            telemetry.instrument(engine=self._store.engine)
        return self._store

    @property
    def publisher(self) -> Publisher:
        """This process's publisher: the reaper's, and a pool process's re-queues."""
        self._check_fork()
        if self._publisher is None:
            app = make_celery(
                self.config.settings, self.config.tenants, broker_url=self.config.broker_url
            )
            self._publisher = Publisher(
                app, self.config.tenants, self.config.signer, self.config.sealer
            )
        return self._publisher

    @property
    def pipeline(self) -> Pipeline:
        """The command pipeline of this pool process."""
        self._check_fork()
        if self._pipeline is None:
            cfg = self.config
            # This thread runs every claim and finish of the pool process, one at a time.
            self.store.pin()
            self._sandbox = Sandbox(workdir_root=workdir_root(cfg.settings))
            self._lease = LeaseKeeper(
                store=self.store,
                redis_url=cfg.broker_url,
                channel=cancel_channel(cfg.settings, cfg.tenant.name, cfg.broker_url),
                tenant=cfg.tenant.name,
                owner=self.worker_id,
                lease_s=cfg.settings.lease_s,
            )
            self._live = LiveOutput(cfg.broker_url, cfg.settings)
            self._pipeline = Pipeline(
                settings=cfg.settings,
                tenant=cfg.tenant,
                store=self.store,
                sandbox=self._sandbox,
                lease=self._lease,
                worker_id=self.worker_id,
                trail=Trail.from_settings(cfg.settings),
                publisher=self.publisher,
                live=self._live,
            )
        return self._pipeline

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            self.after_fork()

    def health(self) -> Health:
        """`/healthz`: the broker answers PING and the store answers a query."""
        url = self.config.broker_url

        def broker() -> None:
            client = redis_client(url, socket_connect_timeout=2, socket_timeout=2)
            try:
                client.ping()
            finally:
                client.close()

        def store() -> None:
            with self.store.engine.connect() as conn:
                conn.execute(text("SELECT 1"))

        return Health({"broker": broker, "store": store})

    def queue_depth(self) -> Iterator[tuple[str, float]]:
        """(tenant, messages waiting) for `execq_queue_depth`; nothing when Redis is down."""
        try:
            client = redis_client(
                self.config.broker_url, socket_connect_timeout=2, socket_timeout=2
            )
            try:
                depth = int(client.llen(queue_key(self.config.settings, self.config.tenant)))
            finally:
                client.close()
        except redis.RedisError:
            return
        yield self.config.tenant.name, float(depth)

    def needs_attention(self) -> Iterator[tuple[str, float]]:
        """(tenant, commands needing a person) for `execq_needs_attention`, read at scrape."""
        tenant = self.config.tenant.name
        try:
            count = self.store.attention_counts().get(tenant, 0)
        except Exception:  # the store is down: /healthz says so; no sample beats a wrong one
            return
        yield tenant, float(count)

    def after_fork(self) -> None:
        """Forget everything inherited from the parent (without closing the parent's sockets)."""
        if self._store is not None:
            self._store.engine.dispose(close=False)
        self._pid = os.getpid()
        # Each pool process exports its own spans (an exporter's thread does not survive fork).
        telemetry.configure(
            service_name="execq-worker",
            attributes={
                "deployment.environment": self.config.settings.env.value,
                "execq.tenant": self.config.tenant.name,
            },
        )
        telemetry.instrument(celery=True)
        self._store = None
        self._pipeline = None
        self._sandbox = None
        self._lease = None
        self._publisher = None
        self._live = None

    def close(self) -> None:
        """Release this process's resources (at pool-process or worker shutdown)."""
        if self._pipeline is not None:
            # audit events held while the audit file's disk was full
            self._pipeline.trail.flush(final=True)
        if self._lease is not None:
            self._lease.stop()
        if self._sandbox is not None:
            self._sandbox.close()
        if self._publisher is not None:
            self._publisher.close()
        if self._live is not None:
            self._live.close()
        if self._store is not None:
            self._store.close_pinned()
            self._store.engine.dispose()
        telemetry.shutdown()
