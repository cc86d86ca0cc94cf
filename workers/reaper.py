"""The reaper: lost workers and the outbox, run inside every `execq worker` (no extra process).

Each worker's main process runs one reaper thread for its tenant. Every third of a lease it
(1) turns expired leases into `failed/worker_lost`, or re-queues retry-safe commands, and
(2) publishes commands the store holds as pending but Redis never got (or lost). Several
workers of one tenant take turns through a short Redis lock; without Redis they still do (1),
and a duplicate publish is harmless because only one delivery can claim a command.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis

from producer import rollback, saga
from producer.audit.events import Outcome, Phase
from producer.audit.trail import Attempt, Trail, subject_of
from producer.broker import Publisher, queue_key
from producer.errors import BrokerUnavailable, StaleVersion
from producer.redisconn import redis_client
from producer.settings import Settings
from producer.states import State
from producer.store.clock import utcnow
from producer.store.repository import Store, requeue_fields
from producer.store.sweeps import Expired
from producer.tenants import Tenant
from workers.metrics import metrics

log = logging.getLogger("execq.reaper")

# A command with secrets waits this long for its own producer to publish it (only the
# producer holds the values) before the reaper publishes it without them.
SECRET_GRACE_S = 300.0
# What one pass takes on at most. A pass that found a full page of anything starts the next
# one after DRAIN_PAUSE_S instead of a third of a lease: 100,000 lost leases drained 100 per
# pass every 10 s took hours (bench.growth); back to back they take minutes.
EXPIRED_PAGE = 100
REPAIR_PAGE = 50
OUTBOX_PAGE = 500
DRAIN_PAUSE_S = 0.05


@dataclass(frozen=True)
class ReapReport:
    """What one pass did."""

    lost: int = 0
    requeued: int = 0
    published: int = 0
    more: bool = False  # a page was full: more of the backlog waits for the next pass


class Reaper:
    """Periodic lease and outbox sweep for one tenant."""

    def __init__(
        self,
        *,
        settings: Settings,
        tenant: Tenant,
        store: Store,
        publisher: Publisher,
        redis_url: str,
        actor: str,
        trail: Trail | None = None,
        host_sweep: Callable[[], object] | None = None,
    ) -> None:
        """`host_sweep`: removes what dead pool processes left on this host (cgroups,
        private directories); run after every pass, whatever the store says."""
        self.settings = settings
        self.tenant = tenant
        self.store = store
        self.publisher = publisher
        self.redis_url = redis_url
        self.actor = actor
        self.trail = trail if trail is not None else Trail.from_settings(settings)
        self.trail.watch(store.audit)
        self.interval_s = max(settings.lease_s / 3, 0.2)
        self.outbox_grace_s = max(2.0, min(settings.lease_s / 3, 10.0))
        self.republish_after_s = max(30.0, 2 * settings.lease_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._redis: redis.Redis | None = None
        # While the store was unreachable no worker could renew a lease: expired leases say
        # nothing about dead workers until every live one has had a lease to renew again.
        self._judge_leases_after = 0.0
        self._host_sweep = host_sweep
        # The broker server last seen (INFO run_id), and while catching up after it changed,
        # the republish age that covers every message the old server held.
        self._broker_run_id: str | None = None
        self._catch_up_s: float | None = None

    def start(self) -> None:
        """Run passes in a daemon thread until stop()."""
        self._thread = threading.Thread(target=self._loop, name="execq-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current pass."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.trail.flush(final=True)

    def _loop(self) -> None:
        delay = self._interval()
        while not self._stop.wait(delay):
            delay = self._interval()
            self._sweep_host()
            try:
                report = self.run_once()
            except Exception:
                log.exception("reaper pass failed; trying again next interval")
                self.store_failed()
                continue
            if report.lost or report.requeued or report.published:
                log.info("reaper: %s", report)
            if report.more:
                delay = DRAIN_PAUSE_S

    def _sweep_host(self) -> None:
        # A pool process killed mid-run (SIGKILL, the OOM killer) leaves its cgroup and its
        # command's private directory; its replacement sweeps them only when it runs a
        # command, and a quiet tenant may not run one for hours.
        if self._host_sweep is None:
            return
        try:
            self._host_sweep()
        except Exception:
            log.exception("sweeping what dead pool processes left failed")

    def store_failed(self) -> None:
        """A pass could not finish (the store, most likely, was unreachable): leases that
        expire meanwhile are judged only a whole lease after the last failure."""
        self._judge_leases_after = time.monotonic() + self.settings.lease_s + self.interval_s

    def _interval(self) -> float:
        return self.interval_s * random.uniform(0.8, 1.2)  # noqa: S311

    def run_once(self) -> ReapReport:
        """One pass: expired leases, rollbacks and batches left behind, then the outbox."""
        lost = requeued = 0
        more = False
        if time.monotonic() >= self._judge_leases_after:
            lost, requeued, more = self._expired_leases()
        more = self._left_behind() or more
        published = self._outbox() if self._take_turn() else 0
        # The tenant's last events need not wait for more appends to be checkpointed, nor
        # (after a full disk) for more appends to reach the audit file.
        self.trail.flush()
        metrics().audit_file(self.tenant.name, self.trail.backlog())
        self.trail.checkpoint_moved([self.tenant.name])
        more = more or published == OUTBOX_PAGE
        return ReapReport(lost=lost, requeued=requeued, published=published, more=more)

    def _left_behind(self) -> bool:
        """Repairs for a worker that died between two writes: a failure whose rollback was
        never queued, a batch whose step ended without the batch moving on. True when a page
        was full."""
        grace = 2 * self.interval_s
        failures = self.store.awaiting_rollback(
            tenant=self.tenant.name, older_than_s=grace, limit=REPAIR_PAGE
        )
        for command_id in failures:
            rollback.after_failure(
                self.store, self.publisher, command_id, actor=self.actor, trail=self.trail
            )
        older = utcnow() - timedelta(seconds=grace)
        batches = self.store.batches.unfinished(
            tenant=self.tenant.name, older_than=older, limit=REPAIR_PAGE
        )
        for batch_id in batches:
            saga.advance(self.store, self.publisher, batch_id, actor=self.actor, trail=self.trail)
        return len(failures) == REPAIR_PAGE or len(batches) == REPAIR_PAGE

    def _expired_leases(self) -> tuple[int, int, bool]:
        lost = requeued = unchanged = 0
        found = self.store.expired_leases(tenant=self.tenant.name, limit=EXPIRED_PAGE)
        for expired in found:
            attempt = Attempt(
                subject_of(expired),
                actor=self.actor,
            )
            if expired.state is State.REVERTING:
                self._lost_compensation(expired, attempt)
                continue
            attempt.add(
                Phase.ABORT, Outcome.FAILED, reason="worker_lost", lease_owner=expired.lease_owner
            )
            rerun = expired.retry_safe and expired.attempts < self.tenant.max_attempts
            fields: dict[str, Any]
            if rerun:
                attempt.add(
                    Phase.RETRY, Outcome.OK, reason="worker_lost", next_attempt=expired.attempts + 1
                )
                to, reason = State.PENDING, "worker lost; retry-safe command re-queued"
                fields = requeue_fields(expired.attempts + 1)
            else:
                to, reason = State.FAILED, "worker_lost"
                fields = {
                    "failure_reason": "worker_lost",
                    "error": "the worker running this command stopped renewing its lease",
                    "lease_expires_at": None,
                    "finished_at": utcnow(),
                }
            try:
                self.store.transition(
                    expired.id,
                    expect_state=State.RUNNING,
                    expect_version=expired.version,
                    to=to,
                    actor=self.actor,
                    reason=reason,
                    events=attempt.events,
                    **fields,
                )
            except StaleVersion:
                unchanged += 1
                continue  # the worker renewed or finished just now, or another reaper won
            self.trail.copy(attempt.events)
            if rerun:
                requeued += 1
                self._publish(expired.id)
            else:
                lost += 1
                log.warning("command %s failed: worker lost", expired.id)
                if expired.rollback_on_failure:
                    rollback.after_failure(
                        self.store,
                        self.publisher,
                        expired.id,
                        actor=self.actor,
                        trail=self.trail,
                        trigger="worker_lost",
                    )
            if expired.batch_id is not None:
                saga.advance(
                    self.store, self.publisher, expired.batch_id, actor=self.actor, trail=self.trail
                )
        # More wait only if this page moved: a page of rows that all changed under us says
        # nothing about what is left, and must not start passes back to back.
        return lost, requeued, len(found) == EXPIRED_PAGE and unchanged < len(found)

    def _lost_compensation(self, expired: Expired, attempt: Attempt) -> None:
        """A compensation whose worker died: never re-run blindly (it may have half-run);
        revert_failed, for a person to look at and roll back again or override."""
        attempt.add(
            Phase.COMPENSATE, Outcome.FAILED, reason="worker_lost", lease_owner=expired.lease_owner
        )
        try:
            self.store.transition(
                expired.id,
                expect_state=State.REVERTING,
                expect_version=expired.version,
                to=State.REVERT_FAILED,
                actor=self.actor,
                reason="worker_lost",
                events=attempt.events,
                compensation={
                    "state": State.REVERT_FAILED.value,
                    "failure_reason": "worker_lost",
                    "error": "the worker running the compensation stopped renewing its lease",
                    "worker": expired.lease_owner,
                    "finished_at": utcnow().isoformat(),
                },
                needs_attention=True,
                lease_owner=None,
                lease_pid=None,
                lease_expires_at=None,
            )
        except StaleVersion:
            return
        self.trail.copy(attempt.events)
        metrics().rollbacks.labels(expired.tenant, "failed").inc()
        log.warning("command %s needs attention: its compensation's worker was lost", expired.id)
        if expired.batch_id is not None:
            saga.advance(
                self.store, self.publisher, expired.batch_id, actor=self.actor, trail=self.trail
            )

    def _take_turn(self) -> bool:
        try:
            if self._redis is None:
                self._redis = redis_client(
                    self.redis_url, socket_connect_timeout=2, socket_timeout=2
                )
            key = self.settings.key("reaper", self.tenant.name)
            ttl_ms = int(self.interval_s * 900)
            if self._redis.set(key, self.actor, nx=True, px=ttl_ms):
                return True
            # Still our turn from the last pass (a drain runs passes back to back).
            if self._redis.get(key) == self.actor.encode():
                self._redis.pexpire(key, ttl_ms)
                return True
            return False
        except (redis.RedisError, OSError):
            return False  # no broker, nothing to publish to anyway

    def _queue_empty(self) -> bool:
        try:
            assert self._redis is not None
            return int(self._redis.llen(queue_key(self.settings, self.tenant))) == 0
        except (redis.RedisError, OSError, AssertionError):
            return False

    def _broker_changed(self) -> float | None:
        """How long the new server has held the queues (s) when the broker is another
        server process than at the last pass (restarted, or a replica promoted by Sentinel);
        None otherwise."""
        try:
            assert self._redis is not None
            info = self._redis.info("server")
            run_id, uptime = str(info["run_id"]), float(info["uptime_in_seconds"])
        except (redis.RedisError, OSError, AssertionError, KeyError, ValueError):
            return None
        before, self._broker_run_id = self._broker_run_id, run_id
        if before is None or before == run_id:
            return None
        # A promoted replica has been up all along, but it holds the queues only since its
        # promotion: what the old primary had not replicated, and the messages workers had
        # taken but not started when their connection broke, are lost. Its replication
        # history says it was promoted (PSYNC2 keeps the old primary's offset), not when:
        # every pending command goes again, as after a restart.
        try:
            replication = self._redis.info("replication")
            promoted = int(replication.get("second_repl_offset", -1)) != -1
        except (redis.RedisError, OSError, ValueError, TypeError):
            promoted = False
        return 0.0 if promoted else uptime

    def _outbox(self) -> int:
        # Commands published long ago but still pending while their queue is empty were lost
        # by Redis (e.g. a restart without persistence): publish them again.
        republish_after = (
            self.republish_after_s if self._queue_empty() else 10 * self.republish_after_s
        )
        uptime = self._broker_changed()
        if uptime is not None:
            # A new server holds only what was published since it started (and, with AOF or
            # a replica, perhaps some of what came before). Waiting republish_after_s for
            # the lost messages made every restart a 30-60 s stall: every command still
            # pending that was published before the server started goes again now. One
            # that did survive arrives twice, and its claim lets only one delivery run it.
            self._catch_up_s = max(self.outbox_grace_s, uptime)
            log.warning(
                "the broker of tenant %s is a new server (up %.0f s): re-publishing the "
                "pending commands published before it started",
                self.tenant.name,
                uptime,
            )
        if self._catch_up_s is not None:
            republish_after = min(republish_after, self._catch_up_s)
        rows = self.store.unpublished(
            tenant=self.tenant.name,
            older_than_s=self.outbox_grace_s,
            republish_after_s=republish_after,
            secret_grace_s=SECRET_GRACE_S,
            limit=OUTBOX_PAGE,
        )
        sent = 0
        for command_id, _tenant in rows:
            if not self._publish(command_id):
                break
            sent += 1
        if len(rows) < OUTBOX_PAGE:
            self._catch_up_s = None  # caught up: back to the ordinary age
        return sent

    def _publish(self, command_id: str) -> bool:
        try:
            self.publisher.publish(command_id, self.tenant.name)
        except BrokerUnavailable as exc:
            log.warning("outbox: broker unavailable: %s", exc)
            return False
        self.store.mark_published([command_id])
        return True
