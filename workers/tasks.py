"""The one Celery task, kept thin: decode the message, hand it to the pipeline."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from sqlalchemy.exc import OperationalError

from producer.broker import TASK_NAME
from workers.pipeline import BadMessage, decode
from workers.runtime import Runtime

log = logging.getLogger("execq.task")


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
            "traceparent": getattr(request, "traceparent", None)
            or (request.headers or {}).get("traceparent")
        }
        try:
            if args:
                raise BadMessage("positional arguments are never sent by execq")
            delivery = decode(request.id, kwargs, headers)
        except BadMessage as exc:
            log.warning("refused message %s: %s", request.id, exc)
            return "refused"
        try:
            return runtime().pipeline.handle(delivery).action
        except OperationalError as exc:
            # The message is acked already; the command is still `pending` in the store, and
            # the outbox publishes it again once the store is back.
            log.error("store unavailable for command %s: %s", delivery.command_id, exc)
            return "store_unavailable"

    return run
