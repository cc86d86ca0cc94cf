"""Celery's revoke/terminate remote-control commands (Flower's buttons) acting on the store.

The only module that touches Celery's remote-control panel. Celery alone would only mark a
task id revoked in each worker's memory (lost on restart, invisible to the store) and, to
terminate, signal the pool process, not the command's process tree. Here every worker of the
command's tenant also records the revoke in the store: a pending command becomes `revoked`
(it never runs, whichever worker later sees its message), and a running one gets its cancel
flag, so its own worker kills the whole tree and records `revoked`.
"""

from __future__ import annotations

import logging
from typing import Any

from producer.audit.events import Outcome, Phase
from producer.audit.trail import Attempt, Trail, subject_of
from producer.errors import NotFound
from producer.revocation import revoke_remote
from producer.signing import EXPIRES, SIGNATURE, BadSignature
from workers.runtime import Runtime

log = logging.getLogger("execq.remote")

ACTOR = "remote-control"
REASON = "revoked through Celery remote control (e.g. Flower)"


def install(runtime: Runtime) -> None:
    """Wrap Celery's `revoke` and `terminate` control commands for this worker."""
    from celery.worker.control import Panel  # noqa: PLC0415

    original = Panel.data["revoke"]
    trail = Trail.from_settings(runtime.config.settings)
    signer = runtime.config.signer

    def revoke(
        state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any
    ) -> Any:
        ids = [str(i) for i in ([task_id] if isinstance(task_id, str) else list(task_id or []))]
        proof = {k: kwargs.pop(k) for k in (SIGNATURE, EXPIRES) if k in kwargs}
        if signer is not None:
            try:
                signer.verify_control("revoke", ids, terminate=bool(terminate), arguments=proof)
            except BadSignature as exc:
                # Not even Celery's in-memory mark: an unsigned revoke changes nothing.
                _refused(runtime, trail, ids, str(exc), terminate=bool(terminate))
                return {"error": f"revoke refused: {exc}"}
        # Celery marks the ids revoked in memory; its terminate (a signal to the pool process)
        # is replaced by the store's cancel flag, which kills the whole process tree.
        reply = original(state, task_id, terminate=False, signal=signal, **kwargs)
        for command_id in ids:
            try:
                _revoke_in_store(runtime, trail, str(command_id), terminate=bool(terminate))
            except Exception:
                log.exception("remote revoke of %s could not reach the store", command_id)
        return reply

    def terminate(state: Any, signal: Any, task_id: Any, **kwargs: Any) -> Any:
        return revoke(state, task_id, terminate=True, signal=signal)

    Panel.data["revoke"] = revoke
    Panel.data["terminate"] = terminate
    if signer is not None and "revoke_by_stamped_headers" in Panel.data:
        # execq never stamps tasks; with signing on, this unsigned way around is closed.
        def by_stamps(state: Any, headers: Any = None, **kwargs: Any) -> Any:
            _refused(runtime, trail, [], "revoke_by_stamped_headers is not accepted", False)
            return {"error": "revoke_by_stamped_headers refused: execq accepts signed revokes"}

        Panel.data["revoke_by_stamped_headers"] = by_stamps


def _refused(runtime: Runtime, trail: Trail, ids: list[str], why: str, terminate: bool) -> None:
    """Log and audit a remote-control revoke that changed nothing (for this tenant's ids)."""
    log.warning("remote-control revoke of %s refused: %s", ids or "stamped tasks", why)
    for command_id in ids:
        try:
            rec = runtime.store.get(command_id)
        except (NotFound, ValueError):
            continue
        if rec.tenant != runtime.config.tenant.name:
            continue  # that tenant's workers audit it in their own chain
        attempt = Attempt(subject_of(rec), actor=runtime.worker_id)
        attempt.add(Phase.REVOKE, Outcome.REFUSED, operator=ACTOR, reason=why, terminate=terminate)
        runtime.store.append_events(attempt.events)
        trail.copy(attempt.events)


def _revoke_in_store(runtime: Runtime, trail: Trail, command_id: str, *, terminate: bool) -> None:
    try:
        rec = runtime.store.get(command_id)
    except NotFound:
        return
    if rec.tenant != runtime.config.tenant.name:
        return  # that tenant's workers act on it
    done = revoke_remote(
        runtime.store,
        trail,
        rec,
        settings=runtime.config.settings,
        broker_url=runtime.config.broker_url,
        actor=runtime.worker_id,
        operator=ACTOR,
        reason=REASON,
        terminate=terminate,
    )
    if done is not None:
        log.warning("command %s %s through remote control", rec.id, done)
