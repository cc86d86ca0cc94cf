"""Batches as sagas: steps run one after another; when one fails, the steps before it are
compensated in reverse order.

A batch moves only through `advance`, which looks at the steps as the store has them and
does the one next thing: release the next held step, start the next compensation, or settle
the batch. It is idempotent and guarded by versions, so the worker that finished a step, the
reaper (after a crash) and an operator may all call it: the result is the same.

    running ──all steps succeeded──▶ succeeded
       │ step k failed, revoked or refused
       ▼
    reverting ──compensations of k-1 … 1 done──▶ reverted (or failed: nothing to undo)
       └──── a compensation failed ────────────▶ revert_failed (a person settles it)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from producer import rollback
from producer.audit.events import Outcome, Phase
from producer.audit.trail import Attempt, Trail, subject_of
from producer.broker import Publisher
from producer.record import CommandRecord
from producer.revocation import revoke_pending
from producer.states import State
from producer.store.batches import (
    FAILED,
    REVERT_FAILED,
    REVERTED,
    REVERTING,
    RUNNING,
    SUCCEEDED,
    BatchRow,
)
from producer.store.repository import Store

log = logging.getLogger("execq.saga")

MAX_STEPS = 100
# Steps are still moving: wait for them before deciding what comes next.
_BUSY = frozenset({State.RUNNING, State.REVERTING})


@dataclass(frozen=True)
class BatchRecord:
    """A batch and its steps (ordinary command records, in step order)."""

    batch: BatchRow
    steps: list[CommandRecord]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: the batch's fields plus each step's record."""
        out = asdict(self.batch)
        for key, value in out.items():
            if hasattr(value, "isoformat"):
                out[key] = value.isoformat()
        out["commands"] = [s.to_json() for s in self.steps]
        return out


def load(store: Store, batch_id: str) -> BatchRecord | None:
    """The batch with its steps, or None."""
    batch = store.batches.get(batch_id)
    if batch is None:
        return None
    return BatchRecord(batch, store.list(batch_id=batch_id, limit=MAX_STEPS))


def advance(
    store: Store, publisher: Publisher, batch_id: str, *, actor: str, trail: Trail
) -> str | None:
    """Do the batch's next thing; returns its state afterwards (None if there is no batch)."""
    m = _Mover(store, publisher, actor, trail)
    for _ in range(10):  # another caller moving the batch at the same time: look again
        found = load(store, batch_id)
        if found is None:
            return None
        batch, steps = found.batch, found.steps
        if batch.terminal:
            return batch.state
        if len(steps) < batch.steps:
            # The producer stopped while writing the steps (their message was never sent).
            _cancel_held(m, steps, 0)
            store.batches.move(
                batch,
                FAILED,
                actor=actor,
                error=f"only {len(steps)} of {batch.steps} steps were recorded",
            )
            continue
        if batch.state == RUNNING:
            done = _run_next(m, batch, steps)
        else:
            done = _revert_next(m, batch, steps)
        if done:
            after = store.batches.get(batch_id)
            return after.state if after else None
    log.warning("batch %s kept changing while advancing it; the reaper will look again", batch_id)
    return None


@dataclass(frozen=True)
class _Mover:
    """Who moves a batch, and with what."""

    store: Store
    publisher: Publisher
    actor: str
    trail: Trail


def _run_next(m: _Mover, batch: BatchRow, steps: list[CommandRecord]) -> bool:
    """True when this call settled what happens now; False to look again."""
    for step in steps:
        if step.state is State.SUCCEEDED:
            continue
        if step.state is State.PENDING and step.held:
            if m.store.release(step.id):
                rollback.send(
                    m.store,
                    m.publisher,
                    step.id,
                    step.tenant,
                    headers=rollback.headers_for(step.trace_id),
                )
            return True
        if step.state in (State.PENDING, State.RUNNING):
            return True  # the step is on its way
        # It failed (or was revoked, refused, or rolled back by hand): undo what came before.
        number = step.batch_step or 0
        if not m.store.batches.move(
            batch,
            REVERTING,
            actor=m.actor,
            failed_step=number,
            error=f"step {number} ended {step.state}"
            + (f" ({step.failure_reason})" if step.failure_reason else ""),
        ):
            return False
        _cancel_held(m, steps, number)
        log.warning("batch %s: step %d ended %s; compensating", batch.id, number, step.state)
        return False  # look again: now reverting
    return m.store.batches.move(batch, SUCCEEDED, actor=m.actor)


def _cancel_held(m: _Mover, steps: list[CommandRecord], failed: int) -> None:
    """Steps after the failed one never run: revoked, audited, with the reason."""
    for step in steps:
        if (step.batch_step or 0) > failed and step.state is State.PENDING:
            attempt = Attempt(subject_of(step), actor=m.actor)
            reason = f"batch stopped at step {failed}"
            attempt.add(Phase.REVOKE, Outcome.OK, operator=m.actor, reason=reason)
            if revoke_pending(m.store, step, attempt, actor=m.actor, reason=reason):
                m.trail.copy(attempt.events)


def _revert_next(m: _Mover, batch: BatchRow, steps: list[CommandRecord]) -> bool:
    if any(s.state in _BUSY or (s.state is State.PENDING and not s.held) for s in steps):
        return True  # a step (or its own compensation) is still running: its end calls again
    if any(s.state is State.REVERT_FAILED for s in steps):
        bad = [str(s.batch_step) for s in steps if s.state is State.REVERT_FAILED]
        log.warning("batch %s needs attention: compensation of step %s failed", batch.id, bad)
        return m.store.batches.move(
            batch,
            REVERT_FAILED,
            actor=m.actor,
            error=f"compensation of step {', '.join(bad)} failed",
        )
    failed = batch.failed_step or len(steps) + 1
    for step in reversed(steps):
        if (step.batch_step or 0) >= failed or step.state is not State.SUCCEEDED:
            continue
        if not (step.compensate or step.snapshot_paths):
            continue  # nothing declared to undo it; the record says so below
        rollback.start(
            m.store,
            m.publisher,
            step,
            actor=m.actor,
            trigger="batch",
            reason=f"batch {batch.id} failed at step {failed}",
            trail=m.trail,
        )
        return True
    undone = any(s.state is State.REVERTED for s in steps)
    return m.store.batches.move(batch, REVERTED if undone else FAILED, actor=m.actor)
