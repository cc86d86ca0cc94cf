"""Undoing and settling commands: the Producer's `rollback` and `override`.

A rollback starts the command's compensation (producer/rollback.py has the rules); an
override is a person settling a command by hand when a compensation cannot. Both are
attributed and audited, and so is every refusal of either.
"""

from __future__ import annotations

from collections.abc import Mapping

from producer import rollback
from producer.audit.events import Outcome, Phase
from producer.audit.trail import Attempt, Trail, subject_of
from producer.errors import InvalidOperation, StaleVersion
from producer.identity import default_principal
from producer.record import CommandRecord
from producer.states import FORCE_OVERRIDE_FROM, OVERRIDE_TO, State
from producer.store.repository import Store


class Reverting:
    """Mixed into Producer, which provides the store, the trail and publishing."""

    store: Store
    trail: Trail

    def _publish(
        self, command_id: str, tenant: str, secrets: dict[str, str], headers: Mapping[str, str]
    ) -> bool:
        raise NotImplementedError

    def rollback(
        self,
        command_id: str,
        *,
        operator: str | None = None,
        reason: str | None = None,
        ticket: str | None = None,
        expect_version: int | None = None,
    ) -> CommandRecord:
        """succeeded/failed/revert_failed -> reverting: queue the command's compensation.

        Only one rollback can run for a command: of several operators asking at once, one
        starts it and the others get InvalidOperation saying so (each refusal is audited).
        `expect_version`: refuse unless the command is still at the version you looked at.
        """
        actor = operator or default_principal()
        rec = self.store.get(command_id, with_transitions=True)
        problem = rollback.refusal(rec, expect_version=expect_version)
        if problem is None:
            try:
                events = rollback.begin(
                    self.store,
                    rec,
                    actor=actor,
                    trigger="operator",
                    reason=reason,
                    operator=actor,
                    ticket=ticket,
                )
            except StaleVersion:
                # Someone else moved it first (most likely another operator's rollback).
                rec = self.store.get(command_id, with_transitions=True)
                problem = rollback.refusal(rec, expect_version=expect_version) or (
                    f"command {command_id} changed while rolling it back; look at it again"
                )
        if problem is not None:
            self._refused(rec, Phase.ROLLBACK, problem, operator=actor, ticket=ticket)
            raise InvalidOperation(problem)
        self.trail.copy(events)
        self._publish(command_id, rec.tenant, {}, rollback.headers_for(rec.trace_id))
        return self.store.get(command_id)

    def override(
        self,
        command_id: str,
        *,
        ticket: str | None,
        operator: str | None,
        reason: str | None,
        resolution: State | str = State.REVERTED,
        force: bool = False,
        approver: str | None = None,
    ) -> CommandRecord:
        """Settle a command by hand: revert_failed -> reverted | failed.

        Ticket, operator and reason are all required. With `force`, a command in another
        state (a stuck `reverting`, or `succeeded`, `failed`, `revoked`) may be settled too,
        but only with a second person's `approver`. Refusals are audited like the override.
        """
        rec = self.store.get(command_id)
        actor = (operator or "").strip() or default_principal()
        problem = _override_problem(rec, ticket, operator, reason, resolution, force, approver)
        if problem is not None:
            self._refused(rec, Phase.OVERRIDE, problem, operator=actor, ticket=ticket)
            raise InvalidOperation(problem)
        to = State(resolution)
        attempt = Attempt(subject_of(rec), actor=actor)
        attempt.add(
            Phase.OVERRIDE,
            Outcome.OK,
            operator=actor,
            ticket=ticket,
            reason=reason,
            from_state=rec.state.value,
            resolution=to.value,
            forced=force,
            approver=approver if force else None,
        )
        try:
            self.store.transition(
                command_id,
                expect_state=rec.state,
                expect_version=rec.version,
                to=to,
                actor=actor,
                reason=f"override ({ticket}): {reason}",
                events=attempt.events,
                override=force,
                needs_attention=False,
                # Settled: recorded with the compensation, and never rolled back automatically.
                compensation={
                    **(rec.compensation or {}),
                    "settled_by": actor,
                    "ticket": ticket,
                    "resolution": to.value,
                    "forced": force,
                },
                lease_owner=None,
                lease_pid=None,
                lease_expires_at=None,
            )
        except StaleVersion:
            raise InvalidOperation(
                f"command {command_id} changed while overriding it; look at it again"
            ) from None
        self.trail.copy(attempt.events)
        return self.store.get(command_id)

    def _refused(
        self,
        rec: CommandRecord,
        phase: Phase,
        problem: str,
        *,
        operator: str,
        ticket: str | None,
    ) -> None:
        """An operator action that was refused is audited too: who tried what, and why not."""
        attempt = Attempt(subject_of(rec), actor=operator)
        attempt.add(phase, Outcome.REFUSED, operator=operator, ticket=ticket, reason=problem)
        self.store.append_events(attempt.events)
        self.trail.copy(attempt.events)


def _override_problem(
    rec: CommandRecord,
    ticket: str | None,
    operator: str | None,
    reason: str | None,
    resolution: State | str,
    force: bool,
    approver: str | None,
) -> str | None:
    """Why an override must be refused, naming what to change; None when it may go ahead."""
    given = {"ticket": ticket, "operator": operator, "reason": reason}
    missing = [f"--{name}" for name, value in given.items() if not (value or "").strip()]
    if missing:
        return (
            f"override of {rec.id} needs {', '.join(missing)}: ticket, operator and reason are "
            "all required (they go into the audit trail)"
        )
    if resolution not in {s.value for s in OVERRIDE_TO}:
        return f"--resolution must be reverted or failed, not {resolution!r}"
    if force:
        if not (approver or "").strip():
            return "--force needs --approver: a second person who approves the override"
        if approver.strip() == (operator or "").strip():  # type: ignore[union-attr]
            return "--approver must be someone other than --operator"
        if rec.state not in FORCE_OVERRIDE_FROM or rec.state.value == resolution:
            return f"command {rec.id} is {rec.state}; even --force cannot make it {resolution}"
        return None
    if rec.state is not State.REVERT_FAILED:
        return (
            f"command {rec.id} is {rec.state}; override settles only revert_failed commands "
            "(a stuck or different case needs --force with a second person's --approver)"
        )
    return None
