"""Running a compensation: restore the command's snapshot, then run its `compensate` argv.

The command is `reverting` and this worker holds its lease (Store.claim_revert). The
compensation runs in the same sandbox as the command did, on the tenant's own pool, under
the same policy (re-checked now), and never gets the command's secrets: they are not stored,
and a rollback may come long after the message that carried them.

The record keeps the command's own exit code, output and failure reason; the compensation's
result goes to `compensation`. Success leaves `reverted`; anything else `revert_failed`,
flagged `needs_attention`, logged at WARNING, and settled by a person (`execq rollback` again,
or `execq override`).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from opentelemetry import trace as otel_trace
from opentelemetry.trace import SpanKind

from producer import policy, tracing
from producer.audit.events import Outcome, Phase, now_ns
from producer.audit.trail import Attempt, subject_of
from producer.errors import ExecutableRefused, PolicyDenied, SandboxError, StaleVersion
from producer.redaction import PATTERNS_ONLY
from producer.spec import cmd_hash
from producer.states import State
from producer.store.claims import ClaimedRevert
from producer.store.clock import utcnow
from workers import snapshot
from workers.binding import Delivery, exec_request, parent_context, redactor_for
from workers.metrics import metrics

if TYPE_CHECKING:
    from workers.pipeline import Pipeline

log = logging.getLogger("execq.compensation")


@dataclass
class _Outcome:
    """What the compensation did so far; `failure` set means it failed."""

    fields: dict[str, Any]
    failure: str | None = None
    error: str | None = None


class CompensationRun:
    """One claimed compensation, run by a pool process's pipeline."""

    def __init__(self, pipeline: Pipeline, claimed: ClaimedRevert, delivery: Delivery) -> None:
        self.p = pipeline
        self.claimed = claimed
        self.delivery = delivery
        redactor = redactor_for(pipeline.tenant, {})
        self.redactor = redactor.with_level(pipeline.tenant.masking)
        self.attempt = Attempt(
            subject_of(claimed),
            actor=pipeline.worker_id,
            redactor=redactor,
        )

    def run(self) -> State | None:
        """Run it and record the result; the state it ended in (None: the lease was lost)."""
        c = self.claimed
        attributes: dict[str, Any] = {
            "execq.tenant": c.tenant,
            "execq.command_id": c.id,
            "execq.revert_count": c.revert_count,
            "execq.snapshot": bool(c.snapshot_paths),
        }
        if c.compensate:
            attributes["execq.executable"] = c.compensate[0]
        with tracing.span(
            "execq.compensate",
            kind=SpanKind.CONSUMER,
            parent=parent_context(c.trace_id, self.delivery),
            attributes=attributes,
            redactor=PATTERNS_ONLY,
        ):
            started = utcnow()
            outcome = self._run()
            return self._finish(outcome, started)

    def _run(self) -> _Outcome:
        c = self.claimed
        out = _Outcome(fields={})
        if c.compensate:
            try:
                policy.check_compensate(tuple(c.compensate), self.p.tenant)
            except PolicyDenied as denied:
                out.failure, out.error = f"policy:{denied.rule}"[:64], str(denied)
                return out
        if c.snapshot_paths:
            self._restore(out)
            if out.failure:
                return out
        if c.compensate:
            self._execute(out)
        return out

    def _restore(self, out: _Outcome) -> None:
        stored = self.p.store.snapshots.load(self.claimed.id)
        here = socket.gethostname()
        if stored is None:
            out.failure = "snapshot_missing"
            out.error = "no snapshot was taken for this command (it never started?)"
        elif stored.host != here:
            out.failure = "snapshot_elsewhere"
            out.error = (
                f"the snapshot was taken on host {stored.host!r}, this worker is on {here!r}: "
                "its paths are that host's, so only a worker there can restore them"
            )
        else:
            try:
                undone = snapshot.restore(stored.archive)
            except (snapshot.SnapshotError, OSError) as exc:
                out.failure, out.error = "snapshot_restore", str(exc)
            else:
                out.fields["snapshot"] = undone.summary()
        self.attempt.add(
            Phase.COMPENSATE,
            Outcome.FAILED if out.failure else Outcome.OK,
            reason=out.error,
            step="snapshot_restore",
            undone=out.fields.get("snapshot"),
        )

    def _execute(self, out: _Outcome) -> None:
        c = self.claimed
        assert c.compensate is not None
        limits = c.compensate_limits or {}
        request = exec_request(
            self.p.tenant,
            command_id=c.id,
            argv=tuple(c.compensate),
            env=c.env,
            parent=parent_context(c.trace_id, self.delivery),
            timeout_s=limits.get("timeout_s"),
            cpu_s=limits.get("cpu_s"),
            memory_mb=limits.get("memory_mb"),
        )
        started = now_ns()
        with self.p.lease.hold(c.id) as cancel:
            try:
                result = self.p.sandbox.run(request, cancel=cancel, on_spawn=self.p.lease.set_pid)
            except (ExecutableRefused, SandboxError) as exc:
                out.failure, out.error = "sandbox_error", str(exc)
                self.attempt.add(
                    Phase.COMPENSATE, Outcome.REFUSED, started_ns=started, reason=str(exc)
                )
                return
        stdout, r1 = self.redactor.scrub(result.stdout)
        stderr, r2 = self.redactor.scrub(result.stderr)
        out.fields.update(
            exit_code=result.exit_code,
            signal=result.signal,
            stdout=stdout,
            stderr=stderr,
            stdout_bytes=result.stdout_bytes,
            stderr_bytes=result.stderr_bytes,
            output_truncated=result.stdout_truncated or result.stderr_truncated,
            redacted=r1 or r2,
            enforced=dict(result.enforced),
        )
        if result.killed is not None:
            out.failure = "timeout" if result.killed == "timeout" else f"{result.killed}_limit"
            if result.killed == "cancelled":
                out.failure = "revoked"
        elif result.exit_code != 0:
            out.failure = "signal" if result.signal else "exit_code"
        self.attempt.add(
            Phase.COMPENSATE,
            Outcome.FAILED if out.failure else Outcome.OK,
            started_ns=started,
            reason=out.failure,
            step="compensate",
            exit_code=result.exit_code,
            signal=result.signal,
            pid=result.pid,
            compensate_hash=cmd_hash(c.compensate),
        )

    def _finish(self, out: _Outcome, started: datetime) -> State | None:
        c = self.claimed
        to = State.REVERT_FAILED if out.failure else State.REVERTED
        error, _ = self.redactor.scrub(out.error)
        compensation = {
            **out.fields,
            "state": to.value,
            "failure_reason": out.failure,
            "error": error,
            "attempt": c.revert_count,
            "requested_by": c.requested_by,
            "why": c.why,
            "worker": self.p.worker_id,
            "started_at": started.isoformat(),
            "finished_at": utcnow().isoformat(),
        }
        tracing.finish_span(
            otel_trace.get_current_span(),
            {"execq.state": to.value, "execq.failure_reason": out.failure},
            error=out.failure,
            redactor=self.attempt.redactor,
        )
        if not any(e.phase == Phase.COMPENSATE for e in self.attempt.events):
            self.attempt.add(Phase.COMPENSATE, Outcome.FAILED, reason=error, step="check")
        try:
            self.p.store.transition(
                c.id,
                expect_state=State.REVERTING,
                expect_version=c.version,
                to=to,
                actor=self.p.worker_id,
                reason=out.failure or "compensated",
                events=self.attempt.events,
                compensation=compensation,
                needs_attention=to is State.REVERT_FAILED,
                lease_owner=None,
                lease_pid=None,
                lease_expires_at=None,
            )
        except StaleVersion:
            log.error("compensation of %s discarded: its lease was taken over", c.id)
            self.attempt.add(Phase.ABORT, Outcome.FAILED, reason="lease_lost", discarded=True)
            self.p.store.append_events(self.attempt.events)
            self.p.trail.copy(self.attempt.events)
            return None
        self.p.trail.copy(self.attempt.events)
        metrics().rollbacks.labels(c.tenant, "reverted" if out.failure is None else "failed").inc()
        if to is State.REVERTED:
            if c.snapshot_paths:
                self.p.store.snapshots.delete(c.id)
            log.info("command %s reverted", c.id)
        else:
            log.warning(
                "command %s needs attention: its compensation failed (%s): %s",
                c.id,
                out.failure,
                error,
            )
        return to
