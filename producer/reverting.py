"""Undoing and settling commands: the Producer's `rollback`, `override` and `approve`.

A rollback starts the command's compensation (producer/rollback.py has the rules); an
override is a person settling a command by hand when a compensation cannot. A forced override
(of a command that is not revert_failed) takes two people: one asks for it, a different
identity approves it. Who acts is the caller's identity, never a name typed beside it. All of
it is attributed and audited, and so is every refusal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from producer import rollback
from producer.audit.events import AuditEvent, Outcome, Phase
from producer.audit.trail import Attempt, Trail, subject_of
from producer.errors import InvalidOperation, StaleVersion
from producer.identity import default_principal, os_identity
from producer.record import CommandRecord
from producer.states import FORCE_OVERRIDE_FROM, OVERRIDE_TO, State
from producer.store.repository import Store

# Why `--approver` is refused: the second person must act as themselves, not be named.
APPROVER_GONE = (
    "--approver is no longer accepted: a second person cannot be named by the first. "
    "`execq override ID --force ...` now only asks for the override; it is carried out when "
    "someone else, as themselves, runs `execq approve ID --ticket T`"
)


@dataclass(frozen=True)
class OverrideRequest:
    """A forced override one identity asked for, waiting for a different one to approve it."""

    command_id: str
    requested_by: str  # the identity that asked
    operator: str  # the name given as --operator: recorded, never trusted
    ticket: str
    reason: str
    resolution: State
    from_state: State
    version: int  # the command's version when asked: any change since voids the request
    requested_at: str
    event_id: str

    @classmethod
    def from_event(cls, event: AuditEvent) -> OverrideRequest:
        """The request an `override_request` audit event records."""
        d = event.detail
        return cls(
            event.command_id,
            str(d["identity"]),
            event.operator or "",
            event.ticket or "",
            event.reason or "",
            State(d["resolution"]),
            State(d["from_state"]),
            int(d["version"]),
            event.ts,
            event.event_id,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what `execq override --force --json` prints beside the record)."""
        return asdict(self) | {
            "resolution": self.resolution.value,
            "from_state": self.from_state.value,
        }


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
        command_id = self.store.resolve_id(command_id)
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
            self._refused(rec, Phase.ROLLBACK, problem, actor=actor, operator=actor, ticket=ticket)
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
        identity: str | None = None,
    ) -> CommandRecord:
        """Settle a command by hand: revert_failed -> reverted | failed.

        Ticket, operator and reason are all required; `operator` is recorded as the name
        given, beside `identity` (who really acts: default the OS user running this). With
        `force`, a command in another state (a stuck `reverting`, or `succeeded`, `failed`,
        `revoked`) is not settled: the override is only asked for (see `pending_override`),
        until a different identity `approve`s it. `approver` is refused: nobody approves for
        someone else. Refusals are audited like the override.
        """
        who = _who(identity)
        claimed = (operator or "").strip() or None
        command_id = self.store.resolve_id(command_id)
        rec = self.store.get(command_id)
        problem = _override_problem(rec, ticket, operator, reason, resolution, force, approver)
        if problem is not None:
            self._refused(rec, Phase.OVERRIDE, problem, actor=who, operator=claimed, ticket=ticket)
            raise InvalidOperation(problem)
        to = State(resolution)
        asked = force and rec.state is not State.REVERT_FAILED
        attempt = Attempt(subject_of(rec), actor=who)
        attempt.add(
            Phase.OVERRIDE_REQUEST if asked else Phase.OVERRIDE,
            Outcome.OK,
            operator=claimed,
            ticket=ticket,
            reason=reason,
            identity=who,
            claimed_operator=claimed,
            from_state=rec.state.value,
            resolution=to.value,
            **({"version": rec.version} if asked else {"forced": False}),
        )
        if asked:
            # Only asked for: nothing changes until a different identity approves it.
            self.store.append_events(attempt.events)
            self.trail.copy(attempt.events)
            return self.store.get(command_id)
        # (Forcing a revert_failed command needs no approval: no force is needed at all.)
        settled = {"settled_by": who, "operator": claimed, "forced": False}
        return self._settle(rec, to, attempt, f"override ({ticket}): {reason}", settled)

    def pending_override(self, command_id: str) -> OverrideRequest | None:
        """The forced override waiting for approval on a command, if any (and still valid)."""
        command_id = self.store.resolve_id(command_id)
        rec = self.store.get(command_id)
        request = self._last_request(command_id)
        if request is None or request.version != rec.version:
            return None
        return request

    def approve(
        self,
        command_id: str,
        *,
        ticket: str | None,
        reason: str | None = None,
        identity: str | None = None,
    ) -> CommandRecord:
        """Carry out the forced override someone else asked for on a command.

        `identity` is who approves (default: the OS user running this); it must differ from
        the identity that asked, `ticket` must be the request's, and the command must not
        have changed since. Each approval and each refusal is audited with both identities.
        """
        who = _who(identity)
        command_id = self.store.resolve_id(command_id)
        rec = self.store.get(command_id)
        request = self._last_request(command_id)
        problem = _approval_problem(rec, request, who, ticket)
        asker = request.requested_by if request is not None else None
        if problem is not None or request is None:
            problem = problem or f"command {command_id} has no forced override to approve"
            self._refused(
                rec, Phase.APPROVE, problem, actor=who, operator=who, ticket=ticket, asker=asker
            )
            raise InvalidOperation(problem)
        attempt = Attempt(subject_of(rec), actor=who)
        # Both events name both identities: the one that asked and the one that approved.
        both: dict[str, Any] = {
            "requested_by": asker,
            "approved_by": who,
            "from_state": rec.state.value,
            "resolution": request.resolution.value,
        }
        attempt.add(
            Phase.APPROVE,
            Outcome.OK,
            operator=who,
            ticket=request.ticket,
            reason=reason,
            identity=who,
            request_event=request.event_id,
            **both,
        )
        claimed = request.operator or None
        attempt.add(
            Phase.OVERRIDE,
            Outcome.OK,
            operator=claimed,
            ticket=request.ticket,
            reason=request.reason,
            approver=who,
            claimed_operator=claimed,
            forced=True,
            **both,
        )
        settled = {"settled_by": asker, "operator": claimed, "approved_by": who, "forced": True}
        why = f"override ({request.ticket}): {request.reason}; approved by {who}"
        return self._settle(rec, request.resolution, attempt, why, settled)

    def _last_request(self, command_id: str) -> OverrideRequest | None:
        """The latest forced override asked for on a command and not approved since."""
        latest: OverrideRequest | None = None
        for event in self.store.audit.events(command_id=command_id):
            if event.outcome != Outcome.OK:
                continue
            if event.phase == Phase.OVERRIDE_REQUEST:
                latest = OverrideRequest.from_event(event)
            elif event.phase == Phase.APPROVE:
                latest = None
        return latest

    def _settle(
        self, rec: CommandRecord, to: State, attempt: Attempt, why: str, settled: dict[str, Any]
    ) -> CommandRecord:
        """Move `rec` to `to` with `attempt`'s events; a race lost is refused and audited."""
        first = attempt.events[0]
        try:
            self.store.transition(
                rec.id,
                expect_state=rec.state,
                expect_version=rec.version,
                to=to,
                actor=attempt.actor,
                reason=why,
                events=attempt.events,
                override=bool(settled["forced"]),
                needs_attention=False,
                # Settled: recorded with the compensation, and never rolled back automatically.
                compensation={
                    **(rec.compensation or {}),
                    **settled,
                    "ticket": first.ticket,
                    "resolution": to.value,
                },
                lease_owner=None,
                lease_pid=None,
                lease_expires_at=None,
            )
        except StaleVersion:
            problem = f"command {rec.id} changed while overriding it; look at it again"
            self._refused(
                rec,
                Phase(first.phase),
                problem,
                actor=attempt.actor,
                operator=first.operator,
                ticket=first.ticket,
            )
            raise InvalidOperation(problem) from None
        self.trail.copy(attempt.events)
        return self.store.get(rec.id)

    def _refused(
        self,
        rec: CommandRecord,
        phase: Phase,
        problem: str,
        *,
        actor: str,
        operator: str | None,
        ticket: str | None,
        asker: str | None = None,
    ) -> None:
        """An operator action that was refused is audited too: who tried what, and why not."""
        attempt = Attempt(subject_of(rec), actor=actor)
        detail: dict[str, Any] = {}
        # A rollback's actor is still only the name given, so it is not called an identity.
        if phase is not Phase.ROLLBACK:
            detail["identity"] = actor
        if phase is Phase.APPROVE:
            detail["requested_by"] = asker
        attempt.add(
            phase, Outcome.REFUSED, operator=operator, ticket=ticket, reason=problem, **detail
        )
        self.store.append_events(attempt.events)
        self.trail.copy(attempt.events)


def _who(identity: str | None) -> str:
    """Who acts: the identity a caller vouches for (e.g. a gateway's token), or the OS user."""
    if identity is None:
        return os_identity()
    if not identity.strip():
        raise ValueError("identity is blank: pass who acts, or None for the OS user")
    return identity.strip()


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
    if approver is not None:
        return APPROVER_GONE
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
        if rec.state not in FORCE_OVERRIDE_FROM or rec.state.value == resolution:
            return f"command {rec.id} is {rec.state}; even --force cannot make it {resolution}"
        return None
    if rec.state is not State.REVERT_FAILED:
        return (
            f"command {rec.id} is {rec.state}; override settles only revert_failed commands "
            "(a stuck or different case needs --force, then someone else's `execq approve`)"
        )
    return None


def _approval_problem(
    rec: CommandRecord, request: OverrideRequest | None, who: str, ticket: str | None
) -> str | None:
    """Why an approval must be refused; None when the request may be carried out."""
    if not (ticket or "").strip():
        return f"approval of {rec.id} needs --ticket: the ticket of the override it approves"
    if request is None:
        return (
            f"command {rec.id} has no forced override waiting for approval "
            "(one is asked for with `execq override ID --force ...`)"
        )
    if request.version != rec.version:
        return (
            f"command {rec.id} changed since {request.requested_by} asked to override it "
            f"(it was {request.from_state} at version {request.version}, it is {rec.state} "
            f"at version {rec.version}); the override must be asked for again"
        )
    # Compared without case: one person under two spellings is still one person.
    if who.casefold() == request.requested_by.casefold():
        return (
            f"{who} asked for this override and cannot also approve it: "
            "a different person must run `execq approve`"
        )
    if (ticket or "").strip() != request.ticket:
        return f"--ticket {(ticket or '').strip()} is not the override's ticket {request.ticket}"
    return None
