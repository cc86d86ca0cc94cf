"""Producer: what a web backend uses to submit, inspect, wait for, revoke and retry commands."""

from __future__ import annotations

import builtins
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from opentelemetry.trace import SpanKind

from config.settings import ConfigInvalid, Settings, load_settings
from config.tenants import TenantsFile, load_tenants
from producer import batching, policy, saga, telemetry, tracing
from producer.audit.events import AuditEvent, Outcome, Phase, Subject, now_ns
from producer.audit.trail import Attempt, Trail, subject_of
from producer.batching import BatchResult
from producer.broker import Publisher, make_celery, resolve_broker_url
from producer.errors import (
    ConfigError,
    InvalidOperation,
    NotFound,
    PolicyDenied,
    StaleVersion,
    UnknownTenant,
)
from producer.identity import default_principal
from producer.outbox import Outbox
from producer.ratelimit import SubmitRateLimiter
from producer.record import CommandRecord
from producer.redisconn import redis_client
from producer.reverting import Reverting
from producer.revocation import CANCEL_CHANNEL, revoke_event, revoke_pending
from producer.saga import BatchRecord
from producer.signing import signer_from_env
from producer.spec import CommandSpec, cmd_hash
from producer.states import RETRYABLE, State, is_terminal
from producer.store.db import make_engine, require_schema
from producer.store.repository import Store, requeue_fields
from producer.tracing import TraceContext, current_or_new

log = logging.getLogger("execq.producer")


@dataclass(frozen=True)
class SubmitResult:
    """What `submit` returns: the command id (= Celery task id) and whether it was a repeat."""

    id: str
    state: State
    duplicate: bool


class Producer(Reverting):
    """Submits commands to the store and the tenant's queue; the store is the source of truth."""

    def __init__(
        self,
        *,
        settings: Settings,
        tenants: TenantsFile,
        store: Store,
        publisher: Publisher,
        broker_url: str,
        trail: Trail | None = None,
    ) -> None:
        self.settings = settings
        self.tenants = tenants
        self.store = store
        self.publisher = publisher
        self.broker_url = broker_url
        self.trail = trail if trail is not None else Trail.from_settings(settings)
        # Who wrote an event: this process (the principal says who asked for the command).
        self.actor = f"producer@{socket.gethostname()}:{os.getpid()}"
        self._redis: redis.Redis | None = None
        self._rate: SubmitRateLimiter | None = None
        self.outbox = Outbox(store, publisher)

    @classmethod
    def from_env(cls) -> Producer:
        """A producer from the `EXECQ_*` settings; raises ConfigError naming a bad setting."""
        try:
            settings = load_settings()
            tenants = load_tenants(settings.tenants_file)
        except ConfigInvalid as exc:
            raise ConfigError(str(exc)) from None
        return cls.from_settings(settings, tenants)

    @classmethod
    def from_settings(cls, settings: Settings, tenants: TenantsFile) -> Producer:
        """A producer for explicit settings (tests, embedding applications)."""
        engine = make_engine(settings.database_url)
        require_schema(engine)
        url = resolve_broker_url(settings)
        publisher = Publisher(
            make_celery(settings, tenants, broker_url=url), tenants, signer_from_env()
        )
        return cls(
            settings=settings,
            tenants=tenants,
            store=Store(engine),
            publisher=publisher,
            broker_url=url,
        )

    # --- submit --------------------------------------------------------------------------

    def submit(self, spec: CommandSpec) -> SubmitResult:
        """Record the command, then queue it; a repeat of a key returns the first command.

        Raises SpecError/UnknownTenant for a malformed spec, PolicyDenied (the refusal is
        recorded as `rejected`), IdempotencyConflict for a reused key with another spec.
        Succeeds while Redis is down: the command is published when the broker is back.
        """
        if not isinstance(spec, CommandSpec):
            raise TypeError(f"submit takes a CommandSpec, not {type(spec).__name__}")
        attributes = {"execq.tenant": spec.tenant, "execq.executable": spec.argv[0]}
        with tracing.span("execq.submit", kind=SpanKind.PRODUCER, attributes=attributes) as span:
            try:
                result = self._submit(spec)
            except (PolicyDenied, UnknownTenant) as refusal:
                tracing.finish_span(
                    span,
                    {"execq.command_id": refusal.command_id, "execq.state": "rejected"},
                    error=type(refusal).__name__,
                    redactor=None,
                )
                raise
            tracing.finish_span(
                span,
                {
                    "execq.command_id": result.id,
                    "execq.state": result.state.value,
                    "execq.duplicate": result.duplicate,
                },
                error=None,
                redactor=None,
            )
            return result

    def _intake(self, spec: CommandSpec, trace: TraceContext) -> tuple[CommandSpec, Attempt]:
        """The spec with its principal, and its attempt holding the `parse` event."""
        started = now_ns()
        principal = spec.principal or default_principal()
        if spec.principal is None:
            spec = spec.model_copy(update={"principal": principal})
        attempt = Attempt(
            Subject(str(uuid.uuid4()), spec.tenant, principal, cmd_hash(spec.argv), trace.trace_id),
            actor=self.actor,
        )
        attempt.add(
            Phase.PARSE,
            Outcome.OK,
            started_ns=started,
            argc=len(spec.argv),
            env_names=sorted(spec.env),
            secret_names=sorted(spec.secrets),
            idempotency_key=spec.idempotency_key,
        )
        return spec, attempt

    def _submit(self, spec: CommandSpec) -> SubmitResult:
        trace = current_or_new()
        spec, attempt = self._intake(spec, trace)
        principal, command_id = attempt.subject.principal, attempt.subject.command_id
        try:
            tenant = policy.check(spec, self.tenants)
            if tenant.submit_rate is not None:
                self._limiter().take(tenant)
        except (PolicyDenied, UnknownTenant) as refusal:
            rule = refusal.rule if isinstance(refusal, PolicyDenied) else "unknown_tenant"
            failure_reason = f"policy:{rule}"[:64]
            attempt.add(Phase.AUTHZ, Outcome.REFUSED, reason=str(refusal), rule=rule)
            attempt.add(Phase.ABORT, Outcome.REFUSED, reason=failure_reason)
            created = self.store.create(
                spec,
                state=State.REJECTED,
                actor=principal,
                reason=str(refusal),
                failure_reason=failure_reason,
                trace_id=trace.trace_id,
                command_id=command_id,
                events=attempt.events,
            )
            if not created.duplicate:
                self.trail.copy(attempt.events)
            refusal.command_id = created.id
            raise
        attempt.add(Phase.AUTHZ, Outcome.OK)
        created = self.store.create(
            spec,
            actor=principal,
            reason="submitted",
            trace_id=trace.trace_id,
            command_id=command_id,
            events=attempt.events,
        )
        if created.duplicate:
            if created.state is State.REJECTED:
                rec = self.store.get(created.id)
                raise PolicyDenied(
                    rec.error or "rejected by policy",
                    rule=rec.failure_reason or "policy",
                    command_id=created.id,
                )
            return SubmitResult(created.id, created.state, duplicate=True)
        self.trail.copy(attempt.events)
        self._publish(created.id, spec.tenant, dict(spec.secrets), _trace_headers(trace))
        return SubmitResult(created.id, State.PENDING, duplicate=False)

    def _publish(
        self, command_id: str, tenant: str, secrets: dict[str, str], headers: Mapping[str, str]
    ) -> bool:
        return self.outbox.send(command_id, tenant, secrets, headers)

    def flush(self, timeout: float = 10.0) -> int:
        """Wait until this producer's commands are published; how many still wait for Redis."""
        return self.outbox.flush(timeout)

    # --- reads ---------------------------------------------------------------------------

    def get(self, command_id: str, *, with_transitions: bool = False) -> CommandRecord:
        """The command's record; raises NotFound."""
        return self.store.get(command_id, with_transitions=with_transitions)

    def list(
        self,
        *,
        tenant: str | None = None,
        state: State | None = None,
        since: datetime | None = None,
        needs_attention: bool = False,
        limit: int = 50,
    ) -> list[CommandRecord]:
        """Newest commands first, filtered by tenant, state, creation time, needing attention."""
        return self.store.list(
            tenant=tenant, state=state, since=since, needs_attention=needs_attention, limit=limit
        )

    def wait(self, command_id: str, timeout: float = 30.0) -> CommandRecord:
        """Block until the command is in a terminal state; raises TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        pause = 0.01
        while True:
            rec = self.store.get(command_id)
            if is_terminal(rec.state):
                return rec
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"command {command_id} still {rec.state} after {timeout:g} s")
            time.sleep(min(pause, remaining))
            pause = min(pause * 1.5, 0.25)

    # --- operator actions ----------------------------------------------------------------

    def revoke(
        self,
        command_id: str,
        *,
        terminate: bool = False,
        operator: str | None = None,
        reason: str | None = None,
        ticket: str | None = None,
    ) -> CommandRecord:
        """Pending: it never runs. Running with terminate=True: its process tree is killed."""
        actor = operator or default_principal()
        for _ in range(5):
            rec = self.store.get(command_id)
            attempt = revoke_event(
                rec, actor=actor, operator=actor, reason=reason, ticket=ticket, terminate=terminate
            )
            if rec.state is State.PENDING:
                if not revoke_pending(self.store, rec, attempt, actor=actor, reason=reason):
                    continue  # claimed or changed meanwhile: look again
                self.trail.copy(attempt.events)
                return self.store.get(command_id)
            if rec.state is State.RUNNING:
                if not terminate:
                    raise InvalidOperation(
                        f"command {command_id} is running; revoke it with terminate=True "
                        "(`--terminate`) to kill its process tree"
                    )
                if not self.store.request_cancel(command_id):
                    continue
                # The worker records how the command ended; this records who asked.
                self.store.append_events(attempt.events)
                self.trail.copy(attempt.events)
                self._announce_cancel(rec.tenant, command_id)
                return self.store.get(command_id)
            raise InvalidOperation(f"command {command_id} is {rec.state}; nothing to revoke")
        raise InvalidOperation(f"command {command_id} kept changing state; try again")

    def _announce_cancel(self, tenant: str, command_id: str) -> None:
        # A hint only: the worker checks the store's cancel flag before it kills anything,
        # and re-reads the flag on every lease renewal if this message is lost.
        try:
            self._redis_client().publish(CANCEL_CHANNEL.format(tenant=tenant), command_id)
        except redis.RedisError as exc:
            log.warning(
                "could not announce cancel of %s (lease renewal will see it): %s", command_id, exc
            )

    def _limiter(self) -> SubmitRateLimiter:
        if self._rate is None:
            self._rate = SubmitRateLimiter(self._redis_client())
        return self._rate

    def _redis_client(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis_client(
                self.broker_url,
                socket_connect_timeout=self.settings.publish_timeout_s,
                socket_timeout=self.settings.publish_timeout_s,
            )
        return self._redis

    def retry(
        self,
        command_id: str,
        *,
        operator: str | None = None,
        reason: str | None = None,
        ticket: str | None = None,
        secrets: dict[str, str] | None = None,
    ) -> CommandRecord:
        """failed/revoked/reverted -> pending with attempts + 1, and queue it again.

        Secret values are never stored: a command that had secrets needs them passed again.
        """
        actor = operator or default_principal()
        rec = self.store.get(command_id)
        if rec.state not in RETRYABLE:
            raise InvalidOperation(
                f"command {command_id} is {rec.state}; only "
                f"{', '.join(sorted(s.value for s in RETRYABLE))} commands can be retried"
            )
        missing = sorted(set(rec.secret_names) - set(secrets or {}))
        if missing:
            raise InvalidOperation(
                f"command {command_id} needs its secrets {missing} again to be retried "
                "(secret values are never stored)"
            )
        attempt = Attempt(subject_of(rec), actor=actor)
        attempt.add(
            Phase.RETRY,
            Outcome.OK,
            operator=actor,
            ticket=ticket,
            reason=reason,
            from_state=rec.state.value,
            next_attempt=rec.attempts + 1,
        )
        try:
            self.store.transition(
                command_id,
                expect_state=rec.state,
                expect_version=rec.version,
                to=State.PENDING,
                actor=actor,
                reason=reason or "retry",
                events=attempt.events,
                **requeue_fields(rec.attempts + 1),
            )
        except StaleVersion:
            raise InvalidOperation(
                f"command {command_id} changed while retrying it; look at it again"
            ) from None
        self.trail.copy(attempt.events)
        trace = current_or_new()
        self._publish(
            command_id,
            rec.tenant,
            dict(secrets or {}),
            # The retry continues the command's own trace, under the operator's span if any.
            _trace_headers(TraceContext(rec.trace_id, trace.span_id)) if rec.trace_id else {},
        )
        return self.store.get(command_id)

    # --- batches -------------------------------------------------------------------------

    def submit_batch(
        self,
        tenant: str,
        steps: Sequence[CommandSpec | Mapping[str, Any]],
        *,
        idempotency_key: str | None = None,
        compensate_on_revoke: bool = False,
        principal: str | None = None,
    ) -> BatchResult:
        """Submit steps that run in order; if step k fails, steps k-1 … 1 are compensated.

        Each step is an ordinary command (its own record, audit events and idempotency key
        `KEY#n` when the batch has a key). Every step is checked against policy before any is
        stored: a refused step raises PolicyDenied and nothing runs.
        """
        return batching.submit(
            self,
            tenant,
            steps,
            idempotency_key=idempotency_key,
            compensate_on_revoke=compensate_on_revoke,
            principal=principal,
        )

    def get_batch(self, batch_id: str) -> BatchRecord:
        """A batch and its steps; raises NotFound."""
        found = saga.load(self.store, batch_id)
        if found is None:
            raise NotFound(f"no batch with id {batch_id!r}")
        return found

    def wait_batch(self, batch_id: str, timeout: float = 60.0) -> BatchRecord:
        """Block until the batch is settled; raises TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.get_batch(batch_id)
            if found.batch.terminal:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"batch {batch_id} still {found.batch.state} after {timeout:g} s"
                )
            time.sleep(0.05)

    def revoke_batch(
        self,
        batch_id: str,
        *,
        compensate: bool | None = None,
        operator: str | None = None,
        reason: str | None = None,
        ticket: str | None = None,
    ) -> BatchRecord:
        """Stop a batch: pending steps never run, the running one is terminated, and (with
        `compensate`, default the batch's compensate_on_revoke) completed ones are undone."""
        return batching.revoke(
            self,
            batch_id,
            compensate=compensate,
            operator=operator or default_principal(),
            reason=reason,
            ticket=ticket,
        )

    def audit_events(
        self,
        *,
        tenant: str | None = None,
        command_id: str | None = None,
        since_ns: int | None = None,
    ) -> builtins.list[AuditEvent]:
        """The store's audit events (all, a tenant's, or one command's), oldest first."""
        return list(
            self.store.audit.events(tenant=tenant, command_id=command_id, since_ns=since_ns)
        )

    def close(self) -> None:
        """Stop background publishing and release connections (and flush execq's own spans)."""
        self.outbox.close()
        self.publisher.close()
        telemetry.shutdown()
        if self._redis is not None:
            self._redis.close()
        self.store.engine.dispose()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _trace_headers(trace: TraceContext) -> dict[str, str]:
    headers = {"traceparent": trace.traceparent}
    if trace.tracestate:
        headers["tracestate"] = trace.tracestate
    return headers
