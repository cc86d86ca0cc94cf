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

from producer.audit.trail import Trail
from producer.errors import NotFound
from producer.revocation import revoke_remote
from workers.runtime import Runtime

log = logging.getLogger("execq.remote")

ACTOR = "remote-control"
REASON = "revoked through Celery remote control (e.g. Flower)"


def install(runtime: Runtime) -> None:
    """Wrap Celery's `revoke` and `terminate` control commands for this worker."""
    from celery.worker.control import Panel  # noqa: PLC0415

    original = Panel.data["revoke"]
    trail = Trail.from_settings(runtime.config.settings)

    def revoke(
        state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any
    ) -> Any:
        # Celery marks the ids revoked in memory; its terminate (a signal to the pool process)
        # is replaced by the store's cancel flag, which kills the whole process tree.
        reply = original(state, task_id, terminate=False, signal=signal, **kwargs)
        for command_id in [task_id] if isinstance(task_id, str) else list(task_id or []):
            try:
                _revoke_in_store(runtime, trail, str(command_id), terminate=bool(terminate))
            except Exception:
                log.exception("remote revoke of %s could not reach the store", command_id)
        return reply

    def terminate(state: Any, signal: Any, task_id: Any, **kwargs: Any) -> Any:
        return revoke(state, task_id, terminate=True, signal=signal)

    Panel.data["revoke"] = revoke
    Panel.data["terminate"] = terminate


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
        broker_url=runtime.config.broker_url,
        actor=runtime.worker_id,
        operator=ACTOR,
        reason=REASON,
        terminate=terminate,
    )
    if done is not None:
        log.warning("command %s %s through remote control", rec.id, done)
