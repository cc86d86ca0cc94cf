"""The one Celery task, kept thin: decode the message, hand it to the pipeline."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from sqlalchemy.exc import OperationalError

from producer import logs
from producer.broker import TASK_NAME
from producer.signing import EXPIRES, SIGNATURE, BadSignature
from workers.binding import Delivery, redactor_for
from workers.pipeline import BadMessage, decode
from workers.runtime import Runtime

log = logging.getLogger("execq.task")


class TaskCrashed(RuntimeError):
    """Replaces an unexpected error, whose message or chain could carry the command's secrets."""


def register(app: Celery, runtime: Callable[[], Runtime]) -> Task:
    """Register `execq.run` on `app`; `runtime` gives the calling process's Runtime."""

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_NAME,
        bind=True,
        acks_late=False,
        ignore_result=True,
        track_started=False,
    )
    def run(self: Task, *args: Any, **kwargs: Any) -> str:
        request = self.request
        headers = {
            name: getattr(request, name, None) or (request.headers or {}).get(name)
            for name in ("traceparent", "tracestate", SIGNATURE, EXPIRES)
        }
        try:
            if args:
                raise BadMessage("positional arguments are never sent by execq")
            signer = runtime().config.signer
            if signer is not None:
                try:
                    signer.verify(request.id, TASK_NAME, kwargs, headers)
                except BadSignature as exc:
                    raise BadMessage(f"refused: {exc}") from None
            delivery = decode(request.id, kwargs, headers, runtime().config.sealer)
        except BadMessage as exc:
            log.warning("refused message %s: %s", request.id, exc)
            # Audited in this pool's chain; the message's own fields are not trusted.
            return runtime().pipeline.refuse(request.id, str(exc)).action
        return handle(runtime, delivery)

    return run


def handle(runtime: Callable[[], Runtime], delivery: Delivery) -> str:
    """Run one delivery with its secrets scrubbed from every log line, crash included."""
    try:
        redactor = redactor_for(runtime().config.tenant, delivery.secrets)
    except Exception as exc:
        # Without a redactor no traceback may be logged: it could show the secrets.
        log.error("command %s: its secrets cannot be scrubbed", delivery.command_id)
        raise _crashed(delivery.command_id, exc) from None
    with logs.command_context(delivery.command_id, tenant=delivery.tenant, redactor=redactor):
        try:
            return runtime().pipeline.handle(delivery, redactor).action
        except OperationalError as exc:
            # The message is acked already; the command is still `pending` in the store, and
            # the outbox publishes it again once the store is back.
            log.error("store unavailable for command %s: %s", delivery.command_id, exc)
            return "store_unavailable"
        except Exception as exc:
            # Logged here, while the context still scrubs the traceback; Celery's own failure
            # line then sees only the sanitized exception.
            log.exception("command %s crashed", delivery.command_id)
            raise _crashed(delivery.command_id, exc) from None


def _crashed(command_id: str, exc: BaseException) -> TaskCrashed:
    return TaskCrashed(f"command {command_id} crashed: {type(exc).__name__}")
