"""One delivery of `execq.run`: claim → authz → bind → execute → archive.

Everything here treats the message as untrusted: it only names a command; the spec that runs
is the one in the store, re-checked against the tenant's policy before anything starts.

Audit: the producer wrote `parse` and `authz` at submit. Here one attempt writes `bind`,
`execute` and `archive` (and `abort` when it fails), all in the transaction that records how
it ended. A policy re-check that fails now is a refused `bind`: the command can no longer be
bound to what the tenant allows.

The same message also carries a compensation: when the command is `reverting` the delivery
claims the compensation instead (workers/compensation.py). After an attempt is recorded, the
follow-ups run: an automatic retry's message (with backoff), the rollback a failure asks
for, and the next move of the command's batch.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from opentelemetry import trace as otel_trace
from opentelemetry.trace import SpanKind
from sqlalchemy.exc import OperationalError

from producer import logs, policy, tracing
from producer.audit.events import NO_COMMAND_HASH, Phase, Subject, now_ns
from producer.audit.events import Outcome as Result
from producer.audit.trail import Attempt, Trail, subject_of
from producer.broker import Publisher
from producer.errors import ExecutableRefused, PolicyDenied, SandboxError, StaleVersion
from producer.redaction import PATTERNS_ONLY, Redactor
from producer.sealing import Sealer, Unsealable
from producer.settings import Settings
from producer.spec import CommandSpec
from producer.states import State
from producer.store.claims import Claimed, ClaimedRevert
from producer.store.clock import utcnow
from producer.store.repository import Store, requeue_fields
from producer.store.sweeps import ran_and_failed
from producer.tenants import Tenant
from workers import snapshot
from workers.binding import Delivery, exec_request, parent_context, redactor_for
from workers.compensation import CompensationRun
from workers.followups import FollowUps, backoff_s, kept_while_waiting
from workers.lease import LeaseKeeper
from workers.live import LiveOutput
from workers.metrics import metrics
from workers.outage import while_store_down
from workers.sandbox import ExecRequest, ExecResult, Sandbox
from workers.sandbox.capture import scrubbing

log = logging.getLogger("execq.pipeline")

# How long a finished command's outcome waits for an unreachable store (at least two leases).
RECORD_RETRY_S = 300.0
# How long a delivery with secrets waits for an unreachable store to claim its command (a
# PostgreSQL restart or failover); past it, the outbox's copy fails with secrets_unavailable.
CLAIM_WAIT_S = 120.0

COMMAND_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class BadMessage(ValueError):
    """Raised when a message's body is not what a producer sends (forged or corrupted)."""


def decode(
    task_id: str | None,
    kwargs: Mapping[str, Any],
    headers: Mapping[str, Any],
    sealer: Sealer | None = None,
) -> Delivery:
    """Validate a message's fields and open its sealed secrets; raises BadMessage naming
    what is wrong."""
    command_id = kwargs.get("command_id")
    tenant = kwargs.get("tenant")
    if not isinstance(command_id, str) or not COMMAND_ID.fullmatch(command_id):
        raise BadMessage("command_id is not a command id")
    if task_id != command_id:
        raise BadMessage(f"task id {task_id!r} is not the command id")
    if not isinstance(tenant, str):
        raise BadMessage("tenant is not a string")
    if "secrets" in kwargs:
        # Producers seal secret values; one in clear text was not written by execq.
        raise BadMessage("secret values in clear text are refused (execq seals them)")
    sealed = kwargs.get("sealed")
    secrets: Any = {}
    if sealed is not None:
        if not isinstance(sealed, str) or sealer is None:
            raise BadMessage("sealed secrets this worker cannot open")
        try:
            secrets = sealer.open(command_id, tenant, sealed)
        except Unsealable as exc:
            raise BadMessage(str(exc)) from None
    if not isinstance(secrets, dict) or not all(
        isinstance(k, str) and ENV_NAME.fullmatch(k) and isinstance(v, str) and _text(v)
        for k, v in secrets.items()
    ):
        raise BadMessage("secrets is not a mapping of variable names to strings")
    extra = set(kwargs) - {"command_id", "tenant", "sealed"}
    if extra:
        raise BadMessage(f"unexpected fields {sorted(extra)}")
    tp, ts = headers.get("traceparent"), headers.get("tracestate")
    return Delivery(
        command_id,
        tenant,
        secrets,
        tp if isinstance(tp, str) else None,
        ts if isinstance(ts, str) else None,
    )


def _text(value: str) -> bool:
    """No NUL and valid UTF-8: what an environment variable (and the redactor) can hold."""
    if "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Handled:
    """What one delivery did, for logs and tests."""

    command_id: str
    action: str  # "ran", "ignored", "refused", "compensated"
    state: State | None = None
    detail: str = ""
    retry_in: float | None = None  # seconds until an automatic retry's message is due


class Pipeline:
    """Runs deliveries for one tenant's pool process."""

    def __init__(
        self,
        *,
        settings: Settings,
        tenant: Tenant,
        store: Store,
        sandbox: Sandbox,
        lease: LeaseKeeper,
        worker_id: str,
        trail: Trail | None = None,
        publisher: Publisher | None = None,
        live: LiveOutput | None = None,
    ) -> None:
        """`live`: publishes output while commands run (without one, only the store has it)."""
        self.settings = settings
        self.tenant = tenant
        self.store = store
        self.sandbox = sandbox
        self.lease = lease
        self.worker_id = worker_id
        self.trail = trail or Trail()
        self.trail.watch(store.audit)  # checkpoints of the chains it appends to
        # Re-queues (retries, rollbacks, a batch's next step); without one the outbox does.
        self.follow_ups = FollowUps(store, publisher, tenant.name, worker_id, self.trail)
        self.live = live

    def refuse(self, command_id: str | None, reason: str, **detail: Any) -> Handled:
        """Audit a delivery that is refused before any command is claimed (parse + abort).

        The event goes to this pool's tenant chain: the message's own fields are untrusted.
        """
        cid = command_id if command_id and COMMAND_ID.fullmatch(command_id) else ""
        # A forged message chooses this text: keep the trail's events small.
        reason = reason[:500]
        detail = {k: v[:100] if isinstance(v, str) else v for k, v in detail.items()}
        attempt = Attempt(
            Subject(cid, self.tenant.name, "unknown", NO_COMMAND_HASH, None, 0),
            actor=self.worker_id,
        )
        attempt.add(Phase.PARSE, Result.REFUSED, reason=reason, **detail)
        attempt.add(Phase.ABORT, Result.REFUSED, reason="refused_delivery")
        self.store.append_events(attempt.events)
        self.trail.copy(attempt.events)
        return Handled(cid, "refused", detail=reason)

    def handle(self, delivery: Delivery, redactor: Redactor | None = None) -> Handled:
        """Claim the command and run it, or acknowledge a delivery that must do nothing.

        `redactor`: the delivery's, from `redactor_for` (the task has made it already).
        """
        if delivery.tenant != self.tenant.name:
            log.warning(
                "refused message for command %s: addressed to tenant %r, this pool serves %r",
                delivery.command_id,
                delivery.tenant,
                self.tenant.name,
            )
            return self.refuse(
                delivery.command_id, "message addressed to another tenant", tenant=delivery.tenant
            )

        def claim() -> Claimed | None:
            return self.store.claim(
                delivery.command_id,
                tenant=self.tenant.name,
                worker=self.worker_id,
                lease_s=self.settings.lease_s,
                max_running=self.tenant.max_concurrent,
            )

        if delivery.secrets:
            # Dropped, this message is re-published from the store, which never holds secret
            # values: the command would fail with secrets_unavailable (make chaos, pg-stop:
            # 57 of 400). It waits for the store instead, holding this pool slot, which a
            # store outage leaves idle anyway.
            claimed = while_store_down(
                claim, wait_s=CLAIM_WAIT_S, what=f"claiming command {delivery.command_id}"
            )
        else:
            claimed = claim()
        if claimed is None:
            reverting = self.store.claim_revert(
                delivery.command_id,
                tenant=self.tenant.name,
                worker=self.worker_id,
                lease_s=self.settings.lease_s,
            )
            if reverting is not None:
                return self._compensate(reverting, delivery)
            found = self.store.lookup(delivery.command_id)
            if self._throttled(found):
                # The tenant runs max_concurrent commands already: come back shortly.
                delay = random.uniform(0.5, 1.0)  # noqa: S311 (timing jitter)
                self.follow_ups.requeue(delivery.command_id, delivery, countdown=delay)
                log.info("command %s waits: tenant at max_concurrent", delivery.command_id)
                return Handled(delivery.command_id, "throttled", detail="max_concurrent")
            detail = self._why_not_claimed(found)
            if detail is not None:
                log.warning("refused delivery of command %s: %s", delivery.command_id, detail)
                return self.refuse(delivery.command_id, detail)
            log.info("ignored repeated delivery of command %s", delivery.command_id)
            return Handled(delivery.command_id, "ignored", detail="duplicate or stale delivery")
        attributes = {
            "execq.tenant": claimed.tenant,
            "execq.command_id": claimed.id,
            "execq.executable": claimed.argv[0],
            "execq.attempt": claimed.attempts,
        }
        if self.tenant.trace_argv:
            attributes["execq.argv"] = list(claimed.argv)
        m = metrics()
        tenant = claimed.tenant
        started = time.monotonic()
        if claimed.published_at is not None:
            wait_s = (utcnow() - claimed.published_at).total_seconds()
            m.queue_wait.labels(tenant).observe(max(0.0, wait_s))
        m.running.labels(tenant).inc()
        try:
            with tracing.span(
                "execq.run",
                kind=SpanKind.CONSUMER,
                parent=parent_context(claimed.trace_id, delivery),
                attributes=attributes,
                redactor=PATTERNS_ONLY,
            ):
                handled = self._run_claimed(claimed, delivery, redactor)
        finally:
            m.running.labels(tenant).dec()
            m.audit_file(tenant, self.trail.backlog())
        self.follow_ups.after_attempt(claimed, delivery, handled)
        if handled.state is not None:
            m.commands.labels(tenant, handled.state.value).inc()
            m.duration.labels(tenant).observe(time.monotonic() - started)
            kind = handled.detail.removesuffix("_limit")
            if handled.detail == "timeout" or handled.detail.endswith("_limit"):
                m.limit_kills.labels(tenant, kind).inc()
        return handled

    def _compensate(self, claimed: ClaimedRevert, delivery: Delivery) -> Handled:
        state = CompensationRun(self, claimed, delivery).run()
        if state is not None and claimed.batch_id is not None:
            self.follow_ups.advance_batch(claimed.batch_id)
        return Handled(claimed.id, "compensated", state)

    def _throttled(self, found: tuple[str, str, bool] | None) -> bool:
        """Whether a pending command of this tenant was not claimed only for max_concurrent."""
        if found is None or self.tenant.max_concurrent is None:
            return False
        tenant, state, held = found
        return tenant == self.tenant.name and state == State.PENDING.value and not held

    def _why_not_claimed(self, found: tuple[str, str, bool] | None) -> str | None:
        """Why a delivery must be refused, or None for a harmless repeat of a known one."""
        if found is None:
            return "unknown command id"
        tenant, _, _ = found
        if tenant != self.tenant.name:
            return f"command belongs to tenant {tenant!r}"
        return None

    def _record(self, claimed: Claimed, to: State, **kwargs: Any) -> None:
        """The finishing transition, retried while the store is unreachable (bounded).

        The command ran: its outcome must not be lost to an outage of the store. The lease is
        held meanwhile, so that once the store is back it is renewed, and no reaper takes a
        live worker for a dead one. Raises StaleVersion when another decision stands; after
        RECORD_RETRY_S, the store's error (the command then stays running until its lease
        expires, as before).
        """
        writes = 0

        def write() -> None:
            nonlocal writes
            writes += 1
            try:
                self.store.transition(
                    claimed.id,
                    expect_state=State.RUNNING,
                    expect_version=claimed.version,
                    to=to,
                    actor=self.worker_id,
                    **kwargs,
                )
            except StaleVersion:
                # A write that committed but whose answer was lost looks stale on retry.
                if writes == 1 or not self._recorded(claimed, to):
                    raise

        with self.lease.hold(claimed.id):
            while_store_down(
                write,
                wait_s=max(RECORD_RETRY_S, 2 * self.settings.lease_s),
                what=f"recording command {claimed.id}",
            )

    def _recorded(self, claimed: Claimed, to: State) -> bool:
        """Whether the store holds this attempt's outcome (written by our own lost answer)."""
        try:
            rec = self.store.get(claimed.id)
        except OperationalError:
            return False
        return rec.state is to and rec.version == claimed.version + 1

    def _finish(
        self,
        claimed: Claimed,
        attempt: Attempt,
        to: State,
        redactor: Redactor | None = None,
        *,
        retry_in: float | None = None,
        snapshot_changes: dict[str, Any] | None = None,
        scrubbed: bool = False,
        **fields: Any,
    ) -> Handled:
        """Record how the attempt ended. `retry_in`: it goes back to pending for an automatic
        retry that many seconds from now; `snapshot_changes`: what it changed there;
        `scrubbed`: capture already took secrets out of the output, before cutting it."""
        if redactor is not None:
            # Nothing the command printed, or any error about it, may carry its secrets.
            redacted = scrubbed
            for name in ("stdout", "stderr", "error"):
                fields[name], changed = redactor.scrub(fields.get(name))
                redacted = redacted or changed
            fields["redacted"] = redacted
        reason = fields.get("failure_reason")
        if any(e.phase == Phase.EXECUTE for e in attempt.events):
            attempt.add(
                Phase.ARCHIVE,
                Result.OK,
                stdout_bytes=fields.get("stdout_bytes"),
                stderr_bytes=fields.get("stderr_bytes"),
                output_truncated=fields.get("output_truncated", False),
                redacted=fields.get("redacted", False),
                snapshot_changes=snapshot_changes,
            )
        if to is not State.SUCCEEDED:
            attempt.add(Phase.ABORT, Result.FAILED, reason=reason, state=to.value)
        if retry_in is not None:
            attempt.add(
                Phase.RETRY,
                Result.OK,
                reason=reason,
                next_attempt=claimed.attempts + 1,
                max_retries=claimed.max_retries,
                delay_s=round(retry_in, 3),
            )
        tracing.finish_span(
            otel_trace.get_current_span(),
            {
                "execq.state": to.value,
                "execq.exit_code": fields.get("exit_code"),
                "execq.failure_reason": reason,
                **{
                    f"execq.enforced.{k}": str(v) for k, v in (fields.get("enforced") or {}).items()
                },
            },
            error=reason,
            redactor=attempt.redactor,
        )
        try:
            self._record(
                claimed,
                to,
                reason=reason,
                events=attempt.events,
                **{"finished_at": utcnow(), "lease_expires_at": None, **fields},
            )
        except StaleVersion:
            # The reaper presumed this worker dead and moved on; its decision stands, and the
            # trail says what this attempt did all the same.
            log.error("result of command %s discarded: its lease was taken over", claimed.id)
            while attempt.events[-1].phase in (Phase.ABORT, Phase.RETRY):
                attempt.events.pop()
            attempt.add(Phase.ABORT, Result.FAILED, reason="lease_lost", discarded=True)
            self.store.append_events(attempt.events)
            self.trail.copy(attempt.events)
            return Handled(claimed.id, "ran", None, "lease lost")
        self.trail.copy(attempt.events)
        return Handled(claimed.id, "ran", to, reason or "", retry_in=retry_in)

    def _run_claimed(self, claimed: Claimed, delivery: Delivery, given: Redactor | None) -> Handled:
        logs.bind(trace_id=claimed.trace_id)
        # Every value the message carried is scrubbed, declared or not: a superset is safe.
        audit_redactor = given or redactor_for(self.tenant, delivery.secrets)
        # Only stored output follows the tenant's masking as is (it may be off).
        redactor = audit_redactor.with_level(self.tenant.masking)
        attempt = Attempt(
            subject_of(claimed),
            actor=self.worker_id,
            redactor=audit_redactor,
        )
        # authz again: the stored spec against the policy this worker holds now. A refusal
        # is a refused bind (see the module docstring).
        try:
            spec = CommandSpec(
                tenant=claimed.tenant,
                argv=tuple(claimed.argv),
                env=dict(claimed.env),
                timeout_s=claimed.timeout_s,
                cpu_s=claimed.cpu_s,
                memory_mb=claimed.memory_mb,
                snapshot_paths=claimed.snapshot_paths,
            )
            if claimed.action is not None:
                # The argv the action was filled into; the action must still exist here.
                spec = spec.model_copy(update={"action": claimed.action})
            policy.check_tenant(spec, self.tenant)
        except PolicyDenied as denied:
            log.warning("command %s refused at authz: %s", claimed.id, denied)
            reason = f"policy:{denied.rule}"[:64]
            attempt.add(Phase.BIND, Result.REFUSED, reason=str(denied), rule=denied.rule)
            return self._finish(
                claimed, attempt, State.FAILED, redactor, failure_reason=reason, error=str(denied)
            )
        except ValueError as exc:  # a stored spec that no longer validates
            attempt.add(Phase.BIND, Result.REFUSED, reason=str(exc), rule="invalid_spec")
            return self._finish(
                claimed,
                attempt,
                State.FAILED,
                redactor,
                failure_reason="invalid_spec",
                error=str(exc),
            )
        # bind: secrets named in the store, values from the message; nothing else.
        missing = sorted(set(claimed.secret_names) - set(delivery.secrets))
        if missing:
            error = (
                f"secret values {missing} did not arrive with the message "
                "(they are never stored; submit or retry with them again)"
            )
            attempt.add(Phase.BIND, Result.REFUSED, reason=error, missing=missing)
            return self._finish(
                claimed,
                attempt,
                State.FAILED,
                failure_reason="secrets_unavailable",
                error=error,
            )
        request = self._bind(claimed, delivery)
        archive: bytes | None = None
        if claimed.snapshot_paths:
            try:
                archive = self._snapshot(claimed)
            except (snapshot.SnapshotError, OSError) as exc:
                # Without its safety net the command does not run.
                attempt.add(Phase.BIND, Result.REFUSED, reason=str(exc), rule="snapshot")
                return self._finish(
                    claimed,
                    attempt,
                    State.FAILED,
                    redactor,
                    failure_reason="snapshot_failed",
                    error=str(exc),
                )
        attempt.add(
            Phase.BIND,
            Result.OK,
            limits=dict(vars(request.limits)),
            env_names=sorted(request.env),
            worker=self.worker_id,
            snapshot_paths=len(claimed.snapshot_paths) or None,
        )
        # execute
        started = now_ns()
        with (
            self.lease.hold(claimed.id) as cancel,
            scrubbing(redactor) as scrubbed,
            self._publishing(claimed.id, redactor, request),
        ):
            try:
                result = self.sandbox.run(request, cancel=cancel, on_spawn=self.lease.set_pid)
            except (ExecutableRefused, SandboxError) as exc:
                reason = (
                    "executable_refused" if isinstance(exc, ExecutableRefused) else "sandbox_error"
                )
                attempt.add(Phase.EXECUTE, Result.REFUSED, started_ns=started, reason=str(exc))
                return self._finish(
                    claimed, attempt, State.FAILED, redactor, failure_reason=reason, error=str(exc)
                )
            lost = self.lease.lost(claimed.id)
        # archive
        if lost:
            log.error("command %s stopped: its lease was taken over", claimed.id)
        return self._archive(
            claimed, attempt, started, result, redactor, archive, redacted=scrubbed.redacted
        )

    def _publishing(
        self, command_id: str, redactor: Redactor, request: ExecRequest
    ) -> contextlib.AbstractContextManager[object]:
        """Live output, scrubbed as the stored output is; each stream up to the size the
        store keeps of its head. Left before the result is recorded: a reader that sees the
        command end has all that was published."""
        if self.live is None:
            return contextlib.nullcontext()
        return self.live.publishing(command_id, redactor, request.limits.output_kb * 1024)

    def _snapshot(self, claimed: Claimed) -> bytes:
        """Archive the snapshot paths into the store, unless an earlier attempt did."""
        stored = self.store.snapshots.load(claimed.id)
        if stored is not None:
            return stored.archive
        taken = snapshot.take(
            claimed.snapshot_paths, max_bytes=self.tenant.snapshot_max_mb * 1024 * 1024
        )
        self.store.snapshots.save(
            claimed.id,
            tenant=claimed.tenant,
            host=socket.gethostname(),
            archive=taken.archive,
            files=taken.files,
            size=taken.bytes,
        )
        return taken.archive

    def _bind(self, claimed: Claimed, delivery: Delivery) -> ExecRequest:
        env = dict(claimed.env)
        env.update({k: delivery.secrets[k] for k in claimed.secret_names})
        return exec_request(
            self.tenant,
            command_id=claimed.id,
            argv=tuple(claimed.argv),
            env=env,
            parent=parent_context(claimed.trace_id, delivery),
            timeout_s=claimed.timeout_s,
            cpu_s=claimed.cpu_s,
            memory_mb=claimed.memory_mb,
        )

    def _archive(
        self,
        claimed: Claimed,
        attempt: Attempt,
        started_ns: int,
        result: ExecResult,
        redactor: Redactor,
        archive: bytes | None = None,
        *,
        redacted: bool = False,
    ) -> Handled:
        fields: dict[str, Any] = {
            "exit_code": result.exit_code,
            "signal": result.signal,
            "stdout": result.stdout,
            "stderr": result.stderr,
            "stdout_bytes": result.stdout_bytes,
            "stderr_bytes": result.stderr_bytes,
            "output_truncated": result.stdout_truncated or result.stderr_truncated,
            "enforced": dict(result.enforced),
            "lease_pid": result.pid,
        }
        if result.killed == "cancelled":
            to, reason = State.REVOKED, "revoked"
        elif result.killed is not None:
            to = State.FAILED
            reason = "timeout" if result.killed == "timeout" else f"{result.killed}_limit"
        elif result.exit_code == 0:
            to, reason = State.SUCCEEDED, None
        else:
            to, reason = State.FAILED, "signal" if result.signal else "exit_code"
        attempt.add(
            Phase.EXECUTE,
            Result.OK if to is State.SUCCEEDED else Result.FAILED,
            started_ns=started_ns,
            reason=reason,
            exit_code=result.exit_code,
            signal=result.signal,
            pid=result.pid,
        )
        if reason is not None:
            fields["failure_reason"] = reason
        changed = None
        if archive is not None:
            try:
                changed = snapshot.diff(archive).summary(limit=10)
            except (snapshot.SnapshotError, OSError) as exc:
                changed = {"error": str(exc)[:200]}
        if (
            to is State.FAILED
            and claimed.retry_safe
            and ran_and_failed(reason)
            and claimed.attempts <= claimed.max_retries
        ):
            delay = backoff_s(self.settings, claimed.attempts)
            now = utcnow()
            fields.update(requeue_fields(claimed.attempts + 1) | kept_while_waiting(fields))
            fields.update(
                error=(
                    f"attempt {claimed.attempts} failed ({reason}); automatic retry "
                    f"{claimed.attempts} of {claimed.max_retries} in {delay:.1f} s"
                ),
                retry_at=now + timedelta(seconds=delay),
                published_at=now,
            )
            return self._finish(
                claimed,
                attempt,
                State.PENDING,
                redactor,
                retry_in=delay,
                snapshot_changes=changed,
                scrubbed=redacted,
                **fields,
            )
        return self._finish(
            claimed, attempt, to, redactor, snapshot_changes=changed, scrubbed=redacted, **fields
        )


def workdir_root(settings: Settings) -> Path:
    """Where this worker makes private command directories (created 0700 if missing)."""
    root = settings.workdir_root.resolve()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root
