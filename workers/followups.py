"""What follows a recorded attempt: an automatic retry's message (with backoff), the rollback
a failure asks for, and the next move of the command's batch.

Each is a separate write after the attempt's own; a crash in between is repaired by the
reaper (an unpublished pending command, a failure whose rollback never started, a batch that
did not move on).
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

from producer import rollback, saga
from producer.audit.trail import Trail
from producer.broker import Publisher
from producer.settings import Settings
from producer.states import State
from producer.store.claims import Claimed
from producer.store.repository import Store
from producer.store.sweeps import ran_and_failed
from workers.binding import Delivery

if TYPE_CHECKING:
    from workers.pipeline import Handled

log = logging.getLogger("execq.followups")


class FollowUps:
    """A pool process's follow-ups; without a publisher they are left to the outbox."""

    def __init__(
        self,
        store: Store,
        publisher: Publisher | None,
        tenant: str,
        actor: str,
        trail: Trail,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.tenant = tenant
        self.actor = actor
        self.trail = trail

    def after_attempt(self, claimed: Claimed, delivery: Delivery, handled: Handled) -> None:
        """Re-queue a retry, start a rollback, move a batch on: whichever the attempt asks."""
        if self.publisher is None:
            return
        try:
            if handled.state is State.PENDING and handled.retry_in is not None:
                self.requeue(claimed.id, delivery, countdown=handled.retry_in)
            elif (
                handled.state is State.FAILED
                and claimed.rollback_on_failure
                and ran_and_failed(handled.detail)
            ):
                rollback.after_failure(
                    self.store, self.publisher, claimed.id, actor=self.actor, trail=self.trail
                )
            if claimed.batch_id is not None and handled.state is not None:
                self.advance_batch(claimed.batch_id)
        except Exception:
            log.exception("follow-up of command %s failed; the reaper will retry it", claimed.id)

    def requeue(self, command_id: str, delivery: Delivery, *, countdown: float) -> None:
        """The delivery's message again (its secrets and trace too), due in `countdown` s."""
        if self.publisher is None:
            return
        headers = {"traceparent": delivery.traceparent} if delivery.traceparent else {}
        rollback.send(
            self.store,
            self.publisher,
            command_id,
            self.tenant,
            headers=headers,
            countdown=countdown,
            secrets=delivery.secrets,
        )

    def advance_batch(self, batch_id: str) -> None:
        """Move the batch on after one of its steps (or a step's compensation) ended."""
        if self.publisher is None:
            return
        try:
            saga.advance(self.store, self.publisher, batch_id, actor=self.actor, trail=self.trail)
        except Exception:
            log.exception("batch %s could not move on; the reaper will retry", batch_id)


def kept_while_waiting(fields: dict[str, Any]) -> dict[str, Any]:
    """What a failed attempt leaves visible while its automatic retry waits."""
    names = ("exit_code", "signal", "stdout", "stderr", "stdout_bytes", "stderr_bytes")
    return {k: fields[k] for k in (*names, "output_truncated", "enforced", "failure_reason")}


def backoff_s(settings: Settings, attempt: int) -> float:
    """Exponential backoff with jitter: about base·2^(attempt-1), capped, never in lockstep.

    The jitter takes the delay uniformly from half to all of it, so many commands failing at
    once (a database restart) do not come back at once.
    """
    ceiling = min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2 ** (attempt - 1))
    return float(ceiling * random.uniform(0.5, 1.0))  # noqa: S311 (timing jitter, not security)
