"""Producer: what a web backend uses to submit, inspect, wait for, revoke and retry commands."""

from __future__ import annotations

import builtins
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from opentelemetry.trace import SpanKind

from producer import actions, batching, policy, saga, telemetry, tracing
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
from producer.revocation import cancel_channel, revoke_event, revoke_pending
from producer.saga import BatchRecord
from producer.sealing import sealer_from_env
from producer.settings import ConfigInvalid, Settings, load_settings
from producer.signing import signer_from_env
from producer.spec import CommandSpec, cmd_hash
from producer.states import RETRYABLE, State, is_terminal
from producer.store.db import make_engine, require_schema
from producer.store.repository import Created, NewCommand, Store, requeue_fields
from producer.tenants import TenantsFile, load_tenants
from producer.tracing import TraceContext, current_or_new

log = logging.getLogger("execq.producer")


@dataclass(frozen=True)
class SubmitResult:
    """What `submit` returns: the command id (= Celery task id) and whether it was a repeat."""

    id: str
    state: State
    duplicate: bool
    # From submit_many, which reports a refusal here instead of raising PolicyDenied.
    rule: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class _Checked:
    """A command through its parse and authz phases, not recorded yet."""

    spec: CommandSpec
    attempt: Attempt
    trace: TraceContext
    refusal: PolicyDenied | None = None
    rule: str | None = None
    failure_reason: str | None = None

    @property
    def state(self) -> State:
        return State.PENDING if self.refusal is None else State.REJECTED

    @property
    def reason(self) -> str:
        return "submitted" if self.refusal is None else str(self.refusal)


@dataclass(frozen=True)
class _Staged:
    """A command recorded in a transaction not yet committed: what follows the commit."""

    result: SubmitResult
    events: Sequence[AuditEvent]  # to copy to the audit file
    message: tuple[str, dict[str, str], dict[str, str]] | None = None  # tenant, secrets, headers
    refusal: PolicyDenied | None = None


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
            make_celery(settings, tenants, broker_url=url),
            tenants,
            signer_from_env(),
            sealer_from_env(settings),
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

        Raises SpecError/UnknownTenant for a malformed spec (nothing is stored or audited),
        PolicyDenied (the refusal is recorded as `rejected`), IdempotencyConflict for a
        reused key with another spec.
        Succeeds while Redis is down: the command is published when the broker is back.
        """
        if not isinstance(spec, CommandSpec):
            raise TypeError(f"submit takes a CommandSpec, not {type(spec).__name__}")
        attributes = {"execq.tenant": spec.tenant}
        if spec.action is not None:
            attributes["execq.action"] = spec.action
        else:
            attributes["execq.executable"] = spec.argv[0]
        with tracing.span("execq.submit", kind=SpanKind.PRODUCER, attributes=attributes) as span:
            try:
                result = self._submit(spec)
            except UnknownTenant as unknown:
                tracing.finish_span(
                    span, {"execq.state": "invalid"}, error=type(unknown).__name__, redactor=None
                )
                raise
            except PolicyDenied as refusal:
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
            action=spec.action,
            env_names=sorted(spec.env),
            secret_names=sorted(spec.secrets),
            idempotency_key=spec.idempotency_key,
        )
        return spec, attempt

    def _submit(self, spec: CommandSpec) -> SubmitResult:
        checked = self._check(spec, current_or_new())
        created = self.store.create(
            checked.spec,
            state=checked.state,
            actor=checked.attempt.subject.principal,
            reason=checked.reason,
            failure_reason=checked.failure_reason,
            trace_id=checked.trace.trace_id,
            command_id=checked.attempt.subject.command_id,
            events=checked.attempt.events,
        )
        return self._release(self._staged(checked, created), raise_refusal=True)

    def submit_many(self, specs: Sequence[CommandSpec]) -> builtins.list[SubmitResult]:
        """Submit several commands with one commit in the store, then publish them all.

        Each is checked, recorded and audited as `submit` does it, in order. A refusal does
        not stop the others: its result is `rejected`, with `rule` and `error`, instead of an
        exception. Raises IdempotencyConflict for a key reused with another spec (nothing of
        the call is stored then), TypeError or SpecError (UnknownTenant included) before
        anything is stored.
        """
        specs = builtins.list(specs)
        for spec in specs:
            if not isinstance(spec, CommandSpec):
                raise TypeError(f"submit_many takes CommandSpecs, not {type(spec).__name__}")
        if not specs:
            return []
        attributes = {"execq.count": len(specs)}
        with tracing.span("execq.submit_many", kind=SpanKind.PRODUCER, attributes=attributes):
            trace = current_or_new()
            checked = [self._check(spec, trace) for spec in specs]
            created = self.store.create_many(
                [
                    NewCommand(
                        spec=c.spec,
                        command_id=c.attempt.subject.command_id,
                        actor=c.attempt.subject.principal,
                        events=c.attempt.events,
                        state=c.state,
                        reason=c.reason,
                        failure_reason=c.failure_reason,
                        trace_id=trace.trace_id,
                    )
                    for c in checked
                ]
            )
            staged = [self._staged(c, made) for c, made in zip(checked, created, strict=True)]
            # One append to the audit file and one Redis round trip for all of them.
            self.trail.copy([event for one in staged for event in one.events])
            self.outbox.send_many(
                [(one.result.id, *one.message) for one in staged if one.message is not None]
            )
            return [one.result for one in staged]

    def resolve(self, spec: CommandSpec) -> CommandSpec:
        """The spec with its action filled in (argv, env, limits...); raw specs as they are.

        Raises PolicyDenied naming the parameter and rule a value breaks. A spec for an
        unknown tenant is returned as it is (submit refuses it with UnknownTenant).
        """
        tenant = self.tenants.get(spec.tenant)
        if spec.action is None or tenant is None:
            return spec
        return actions.resolve(spec, tenant)

    def _check(self, spec: CommandSpec, trace: TraceContext) -> _Checked:
        """The parse and authz phases of one command: its audit events, and its refusal.

        Raises UnknownTenant first: a tenant the file does not define is a malformed spec,
        not a policy decision, so nothing is recorded or audited for it (no tenant's
        history could hold it, and a typo must not leave rows behind).
        """
        policy.tenant_for(spec.tenant, self.tenants)
        unfilled: PolicyDenied | None = None
        try:
            spec = self.resolve(spec)
        except PolicyDenied as refusal:
            unfilled = refusal  # recorded below like any refusal, with no argv to show
            spec = actions.storable(spec, self.tenants.get(spec.tenant))
        spec, attempt = self._intake(spec, trace)
        try:
            if unfilled is not None:
                raise unfilled
            tenant = policy.check(spec, self.tenants)
            if tenant.submit_rate is not None:
                self._limiter().take(tenant)
        except PolicyDenied as refusal:
            rule = refusal.rule
            failure_reason = f"policy:{rule}"[:64]
            attempt.add(Phase.AUTHZ, Outcome.REFUSED, reason=str(refusal), rule=rule)
            attempt.add(Phase.ABORT, Outcome.REFUSED, reason=failure_reason)
            return _Checked(spec, attempt, trace, refusal, rule, failure_reason)
        attempt.add(Phase.AUTHZ, Outcome.OK)
        return _Checked(spec, attempt, trace)

    def _staged(self, checked: _Checked, created: Created) -> _Staged:
        """What follows the commit of a command recorded as `created`."""
        events = () if created.duplicate else checked.attempt.events
        if checked.refusal is not None:
            refusal = checked.refusal
            refusal.command_id = created.id
            result = SubmitResult(
                created.id, State.REJECTED, created.duplicate, checked.rule, str(refusal)
            )
            return _Staged(result, events, refusal=refusal)
        if created.duplicate:
            if created.state is State.REJECTED:
                rec = self.store.get(created.id)
                denied = PolicyDenied(
                    rec.error or "rejected by policy",
                    rule=rec.failure_reason or "policy",
                    command_id=created.id,
                )
                result = SubmitResult(created.id, State.REJECTED, True, denied.rule, str(denied))
                return _Staged(result, (), refusal=denied)
            return _Staged(SubmitResult(created.id, created.state, duplicate=True), ())
        spec, trace = checked.spec, checked.trace
        message = (spec.tenant, dict(spec.secrets), _trace_headers(trace))
        return _Staged(SubmitResult(created.id, State.PENDING, False), events, message)

    def _release(self, staged: _Staged, *, raise_refusal: bool) -> SubmitResult:
        """After the commit: audit to the trail, publish, and raise a refusal if asked to."""
        if staged.events:
            self.trail.copy(staged.events)
        if staged.message is not None:
            self._publish(staged.result.id, *staged.message)
        if raise_refusal and staged.refusal is not None:
            raise staged.refusal
        return staged.result

    def _publish(
        self, command_id: str, tenant: str, secrets: dict[str, str], headers: Mapping[str, str]
    ) -> bool:
        return self.outbox.send(command_id, tenant, secrets, headers)

    def flush(self, timeout: float = 10.0) -> int:
        """Wait until this producer's commands are published; how many still wait for Redis."""
        return self.outbox.flush(timeout)

    # --- reads ---------------------------------------------------------------------------

    def resolve_id(self, id_or_prefix: str, *, tenant: str | None = None) -> str:
        """The full id of a command given by its id or a unique prefix of it (8 characters or
        more), among `tenant`'s commands only when given; raises NotFound or AmbiguousId.

        Every method here that takes a command id (or a batch id) accepts such a prefix.
        """
        return self.store.resolve_id(id_or_prefix, tenant=tenant)

    def unique_prefixes(self, ids: Iterable[str]) -> dict[str, str]:
        """Each id's shortest prefix (8 characters or more) that `resolve_id` takes back."""
        return self.store.unique_prefixes(ids)

    def get(self, command_id: str, *, with_transitions: bool = False) -> CommandRecord:
        """The command's record; raises NotFound."""
        return self.store.get(self.resolve_id(command_id), with_transitions=with_transitions)

    def list(
        self,
        *,
        tenant: str | None = None,
        state: State | None = None,
        since: datetime | None = None,
        needs_attention: bool = False,
        limit: int = 50,
        after: tuple[datetime, str] | None = None,
    ) -> list[CommandRecord]:
        """Newest commands first, filtered by tenant, state, creation time, needing attention;
        `after` (created_at, id of a page's last record) gives the next page."""
        return self.store.list(
            tenant=tenant,
            state=state,
            since=since,
            needs_attention=needs_attention,
            limit=limit,
            after=after,
        )

    def wait(
        self,
        command_id: str,
        timeout: float = 30.0,
        *,
        progress: Callable[[CommandRecord], object] | None = None,
    ) -> CommandRecord:
        """Block until the command is in a terminal state; raises TimeoutError after `timeout`.

        `progress` is called with each record read before the end (a spinner shows it).
        """
        deadline = time.monotonic() + timeout
        pause = 0.01
        command_id = self.resolve_id(command_id)
        while True:
            rec = self.store.get(command_id)
            if is_terminal(rec.state):
                return rec
            if progress is not None:
                progress(rec)
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
        command_id = self.resolve_id(command_id)
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
            channel = cancel_channel(self.settings, tenant, self.broker_url)
            self._redis_client().publish(channel, command_id)
        except redis.RedisError as exc:
            log.warning(
                "could not announce cancel of %s (lease renewal will see it): %s", command_id, exc
            )

    def _limiter(self) -> SubmitRateLimiter:
        if self._rate is None:
            self._rate = SubmitRateLimiter(self._redis_client(), self.settings)
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
        command_id = self.resolve_id(command_id)
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
        found = saga.load(self.store, self.store.batches.resolve_id(batch_id))
        if found is None:
            raise NotFound(f"no batch with id {batch_id!r}")
        return found

    def wait_batch(self, batch_id: str, timeout: float = 60.0) -> BatchRecord:
        """Block until the batch is settled; raises TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        batch_id = self.store.batches.resolve_id(batch_id)
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
            self.store.batches.resolve_id(batch_id),
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
        self.trail.flush(final=True)  # audit events held while the audit file's disk was full
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
