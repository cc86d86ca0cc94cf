"""Submitting and revoking batches (the Producer's side of sagas; producer/saga.py moves them).

A batch row is written first, then its steps: step 1 pending, the others pending but held.
A crash in between leaves a batch with fewer step rows than it names, which `saga.advance`
settles as failed (nothing of it ran beyond what is recorded).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from producer import policy, saga
from producer.audit.events import Outcome, Phase
from producer.errors import IdempotencyConflict, InvalidOperation, NotFound, SpecError
from producer.identity import default_principal
from producer.saga import MAX_STEPS, BatchRecord
from producer.spec import CommandSpec
from producer.states import State
from producer.store.batches import REVERTING, REVOKED, RUNNING
from producer.store.clock import utcnow
from producer.tracing import current_or_new

if TYPE_CHECKING:
    from producer.client import Producer

MAX_BATCH_KEY = 190


@dataclass(frozen=True)
class BatchResult:
    """What `submit_batch` returns: the batch id, its steps' command ids, whether a repeat."""

    id: str
    state: str
    duplicate: bool
    command_ids: list[str]


def _specs(tenant: str, steps: Sequence[CommandSpec | Mapping[str, Any]]) -> list[CommandSpec]:
    if not 1 <= len(steps) <= MAX_STEPS:
        raise SpecError(f"a batch has 1 to {MAX_STEPS} steps, not {len(steps)}")
    specs = []
    for number, step in enumerate(steps, 1):
        if isinstance(step, CommandSpec):
            spec = step
        elif isinstance(step, Mapping):
            if not all(isinstance(k, str) for k in step):
                raise SpecError(f"step {number}: field names must be strings")
            try:
                spec = CommandSpec(**{"tenant": tenant, **step})
            except SpecError as exc:
                raise SpecError(f"step {number}: {exc}") from None
        else:
            raise SpecError(f"step {number} is a {type(step).__name__}, not a spec or mapping")
        if spec.tenant != tenant:
            raise SpecError(
                f"step {number} is for tenant {spec.tenant!r}, the batch for {tenant!r}"
            )
        if spec.idempotency_key is not None:
            raise SpecError(
                f"step {number} has its own idempotency key; the batch's key covers its steps"
            )
        specs.append(spec)
    return specs


def _batch_hash(specs: list[CommandSpec], compensate_on_revoke: bool) -> str:
    blob = json.dumps(
        {"steps": [s.canonical() for s in specs], "compensate_on_revoke": compensate_on_revoke},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def submit(
    producer: Producer,
    tenant: str,
    steps: Sequence[CommandSpec | Mapping[str, Any]],
    *,
    idempotency_key: str | None,
    compensate_on_revoke: bool,
    principal: str | None,
) -> BatchResult:
    """See Producer.submit_batch."""
    specs = _specs(tenant, steps)
    if idempotency_key is not None and len(idempotency_key) > MAX_BATCH_KEY:
        # Each step's key is `KEY#n`, and a key is at most 200 characters.
        raise SpecError(f"a batch's idempotency key has at most {MAX_BATCH_KEY} characters")
    resolved = []
    for spec in specs:
        try:
            filled = producer.resolve(spec)
            policy.check(filled, producer.tenants)
        except Exception:
            # Recorded and audited as a rejected command, like any refused submit.
            producer.submit(spec)
            raise
        resolved.append(filled)
    specs = resolved
    store = producer.store
    spec_hash = _batch_hash(specs, compensate_on_revoke)
    if idempotency_key is not None:
        found = store.batches.by_key(tenant, idempotency_key)
        if found is not None:
            return _repeat(producer, found.id, found.spec_hash, spec_hash, idempotency_key)
    trace = current_or_new()
    batch_id = str(uuid.uuid4())
    now = utcnow()
    who = principal or specs[0].principal or default_principal()
    created = store.batches.create(
        {
            "id": batch_id,
            "tenant": tenant,
            "idempotency_key": idempotency_key,
            "spec_hash": spec_hash,
            "principal": who,
            "trace_id": trace.trace_id,
            "state": RUNNING,
            "version": 1,
            "steps": len(specs),
            "failed_step": None,
            "compensate_on_revoke": compensate_on_revoke,
            "error": None,
            "last_actor": producer.actor,
            "created_at": now,
            "updated_at": now,
            "finished_at": None,
        }
    )
    if created is None:  # another producer won the key just now
        assert idempotency_key is not None
        found = store.batches.by_key(tenant, idempotency_key)
        assert found is not None
        return _repeat(producer, found.id, found.spec_hash, spec_hash, idempotency_key)
    ids = []
    for number, given in enumerate(specs, 1):
        key = f"{idempotency_key}#{number}" if idempotency_key else None
        keyed = given.model_copy(
            update={"idempotency_key": key, "principal": given.principal or who}
        )
        spec, attempt = producer._intake(keyed, trace)
        attempt.add(Phase.AUTHZ, Outcome.OK, batch_id=batch_id, step=number)
        result = store.create(
            spec,
            actor=attempt.subject.principal,
            reason=f"batch {batch_id} step {number}",
            trace_id=trace.trace_id,
            command_id=attempt.subject.command_id,
            events=attempt.events,
            batch=(batch_id, number, number > 1),
        )
        producer.trail.copy(attempt.events)
        ids.append(result.id)
    first = specs[0]
    headers = {"traceparent": trace.traceparent}
    producer._publish(ids[0], tenant, dict(first.secrets), headers)
    return BatchResult(batch_id, RUNNING, duplicate=False, command_ids=ids)


def _repeat(producer: Producer, batch_id: str, stored: str, asked: str, key: str) -> BatchResult:
    if stored != asked:
        raise IdempotencyConflict(
            f"idempotency key {key!r} was used for another batch ({batch_id}) with other steps",
            command_id=batch_id,
        )
    found = producer.get_batch(batch_id)
    return BatchResult(
        batch_id, found.batch.state, duplicate=True, command_ids=[s.id for s in found.steps]
    )


def revoke(
    producer: Producer,
    batch_id: str,
    *,
    compensate: bool | None,
    operator: str,
    reason: str | None,
    ticket: str | None,
) -> BatchRecord:
    """See Producer.revoke_batch."""
    store = producer.store
    for _ in range(5):
        found = saga.load(store, batch_id)
        if found is None:
            raise NotFound(f"no batch with id {batch_id!r}")
        batch, steps = found.batch, found.steps
        if batch.state != RUNNING:
            raise InvalidOperation(f"batch {batch_id} is {batch.state}; nothing to revoke")
        undo = batch.compensate_on_revoke if compensate is None else compensate
        # The batch moves first, so a step ending now does not release the next one. With
        # compensation, every step up to the running one counts as done-or-undone.
        unfinished = [s.batch_step or 0 for s in steps if s.state is not State.SUCCEEDED]
        cut = (min(unfinished) if unfinished else len(steps)) + 1
        why = reason or "batch revoked"
        if store.batches.move(
            batch,
            REVERTING if undo else REVOKED,
            actor=operator,
            failed_step=cut,
            error=f"revoked by {operator}" + (f" ({ticket})" if ticket else ""),
        ):
            break
    else:
        raise InvalidOperation(f"batch {batch_id} kept changing; try again")
    for step in steps:
        if step.state in (State.PENDING, State.RUNNING):
            # As it is now, not as read above: a pending step may have started meanwhile.
            with contextlib.suppress(InvalidOperation):  # it ended meanwhile
                producer.revoke(
                    step.id, terminate=True, operator=operator, reason=why, ticket=ticket
                )
    if undo:
        saga.advance(store, producer.publisher, batch_id, actor=operator, trail=producer.trail)
    return producer.get_batch(batch_id)
