"""The Celery side shared by producers and workers: app settings, queues, and publishing.

Redis only carries work: a message holds the command id, its tenant and (transiently) the
secret values sealed with the tenant's key, never the spec. Workers read the spec from the
store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Exchange, Queue  # type: ignore[attr-defined]

from producer import kombu_redis
from producer.errors import BrokerUnavailable, ConfigError
from producer.redisconn import celery_broker
from producer.sealing import Sealer
from producer.settings import EMBEDDED_BROKER, Settings, project_path
from producer.signing import Signer
from producer.tenants import Tenant, TenantsFile

log = logging.getLogger("execq.broker")

TASK_NAME = "execq.run"
EXCHANGE = Exchange("execq", type="direct", durable=True)  # type: ignore[no-untyped-call]


def embedded_url_file() -> Path:
    """Where `execq up`/`demo` write the URL of the embedded Redis they started."""
    return project_path(Path(".execq/redis.url"))


def resolve_broker_url(settings: Settings) -> str:
    """The Redis URL to use; `embedded` means the server `execq up`/`demo` started here."""
    if settings.broker_url != EMBEDDED_BROKER:
        return settings.broker_url
    url_file = embedded_url_file()
    try:
        return url_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(
            "invalid setting EXECQ_BROKER_URL: `embedded` but no embedded Redis is running "
            f"here ({url_file} is missing): start one with `execq up`"
        ) from None


def key_prefix(settings: Settings) -> str:
    """What kombu puts before every Redis key and channel it uses: `<namespace>.`."""
    return f"{settings.namespace}."


def queue_key(settings: Settings, tenant: Tenant) -> str:
    """The Redis list that holds `tenant`'s queue (`execq.<tenant>` by default)."""
    return key_prefix(settings) + tenant.queue


def tenant_queues(tenants: TenantsFile) -> list[Queue]:
    """One declared, durable queue per tenant (named after it); nothing else is consumed."""
    return [
        Queue(t.queue, EXCHANGE, routing_key=t.queue, durable=True)  # type: ignore[no-untyped-call]
        for t in tenants.tenants.values()
    ]


def visibility_timeout_s(settings: Settings, tenants: TenantsFile) -> int:
    """Above the largest command timeout plus a lease, so Redis never redelivers a live run."""
    return int(tenants.largest_timeout_s + 2 * settings.lease_s + 600)


def celery_config(settings: Settings, tenants: TenantsFile, broker_url: str) -> dict[str, Any]:
    """Celery settings; the reasons are in ARCHITECTURE.md and the Celery issue tracker."""
    vt = visibility_timeout_s(settings, tenants)
    # A sentinel URL's master_name (and sentinel password) are kombu transport options.
    url, sentinel_options = celery_broker(
        broker_url, socket_connect_timeout=settings.publish_timeout_s
    )
    transport = {
        # Every key, list and pub/sub channel kombu (and so Celery) uses starts with the
        # namespace: deployments with different namespaces share one Redis database without
        # seeing each other's messages, remote-control broadcasts or events.
        "global_keyprefix": key_prefix(settings),
        # kombu's own keys move under `_kombu.`, where no tenant's queue can be (a tenant
        # named `unacked` would otherwise share its list with kombu's hash of that name).
        "unacked_key": "_kombu.unacked",
        "unacked_index_key": "_kombu.unacked_index",
        "unacked_mutex_key": "_kombu.unacked_mutex",
        "visibility_timeout": vt,
        "socket_keepalive": True,
        "socket_connect_timeout": settings.publish_timeout_s,
        "max_retries": 0,
        **sentinel_options,
    }
    return {
        "broker_url": url,
        "broker_transport_options": transport,
        "broker_connection_timeout": settings.publish_timeout_s,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "visibility_timeout": vt,
        # JSON only: a pickle in Redis would be code execution for anyone who can write there.
        "accept_content": ["json"],
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_queues": tenant_queues(tenants),
        "task_create_missing_queues": False,
        "task_default_exchange": EXCHANGE.name,
        "task_default_exchange_type": "direct",
        # Early ack (when a pool process starts the task), on purpose. The store, not Redis,
        # keeps a command alive: once claimed it holds a lease, and a message lost before its
        # claim is re-published by the outbox.
        # Late ack would add nothing but Redis' visibility-timeout redeliveries and a Celery
        # 5.7 crash: after a broker restart, acking a message received before it stops the
        # whole worker (AttributeError in kombu's Redis channel).
        "task_acks_late": False,
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        # A Redis blip must not kill a running migration or backup.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # What Flower shows of a command; measured, about 12 % of a busy worker's throughput.
        # Off, a worker still sends heartbeats, and Flower's periodic `enable_events`
        # broadcast (its default) turns task events on while a Flower watches.
        "worker_send_task_events": settings.flower_events,
        # With it, Flower lists a queued command (name, safe kwargsrepr) before any worker has
        # it; off by default, as it doubles the producer's Redis work per submit. The store
        # lists queued commands anyway (`execq list --state pending`).
        "task_send_sent_event": settings.flower_sent_events,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
    }


def make_celery(
    settings: Settings, tenants: TenantsFile, *, broker_url: str | None = None
) -> Celery:
    """A Celery app configured for execq (the producer only publishes with it)."""
    url = broker_url or resolve_broker_url(settings)
    # kombu_redis.AMQP: kombu's Redis transport, one redis-py client per channel.
    app = Celery("execq", set_as_current=False, amqp=f"{kombu_redis.__name__}:AMQP")
    app.conf.update(celery_config(settings, tenants, url))
    return app


class Publisher:
    """Publishes `execq.run` messages: task id = command id, queue = the tenant's queue."""

    def __init__(
        self,
        app: Celery,
        tenants: TenantsFile,
        signer: Signer | None = None,
        sealer: Sealer | None = None,
    ) -> None:
        self.app = app
        self.tenants = tenants
        self.signer = signer
        self.sealer = sealer
        self._local = threading.local()  # the kombu producer of a batched() block

    def publish(
        self,
        command_id: str,
        tenant: str,
        *,
        secrets: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        countdown: float | None = None,
    ) -> None:
        """Send one message; raises BrokerUnavailable quickly instead of retrying for long.

        `countdown`: deliver no earlier than this many seconds from now (retry backoff). The
        delay stays far below the visibility timeout; a redelivery would be harmless anyway,
        since only one delivery can claim a command.
        """
        queue = self.tenants.tenants[tenant].queue
        kwargs: dict[str, Any] = {"command_id": command_id, "tenant": tenant}
        if secrets:
            if self.sealer is None:
                raise ConfigError("secret values can only be published sealed: no sealer")
            # Redis never holds a secret in clear text; only the tenant's workers open it.
            kwargs["sealed"] = self.sealer.seal(command_id, tenant, secrets)
        sent_headers = dict(headers or {})
        if self.signer is not None:
            sent_headers.update(
                self.signer.sign(command_id, TASK_NAME, kwargs, not_before_s=countdown or 0.0)
            )
        try:
            self.app.send_task(
                TASK_NAME,
                kwargs=kwargs,
                task_id=command_id,
                # No exchange: Celery then publishes through the anonymous exchange straight
                # into the queue's list. A named exchange needs its binding in Redis, which a
                # Redis restart without persistence loses, and kombu then drops the message.
                queue=queue,
                declare=[],
                retry=False,
                countdown=countdown,
                producer=getattr(self._local, "producer", None),
                headers=sent_headers,
                # What Flower and task events show: never the secret values.
                argsrepr="()",
                kwargsrepr=repr(
                    {"command_id": command_id, "tenant": tenant, "secrets": sorted(secrets or {})}
                ),
            )
        except Exception as exc:  # kombu/redis raise many types for one cause: unreachable
            raise BrokerUnavailable(f"could not publish command {command_id}: {exc}") from exc

    @contextmanager
    def batched(self) -> Iterator[None]:
        """Publish everything inside through one connection in one pipeline, sent when the
        block ends (kombu's Producer.batch); BrokerUnavailable if that fails."""
        if getattr(self._local, "producer", None) is not None:
            raise RuntimeError("batched() does not nest")
        try:
            with self.app.producer_or_acquire() as producer, producer.batch():
                self._local.producer = producer
                try:
                    yield
                finally:
                    self._local.producer = None
        except BrokerUnavailable:
            raise
        except Exception as exc:  # kombu/redis raise many types for one cause: unreachable
            raise BrokerUnavailable(f"could not publish a batch of messages: {exc}") from exc

    def close(self) -> None:
        """Release broker connections."""
        self.app.close()
