"""Riding out a store outage inside a pool process, for what cannot be done again later."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import OperationalError

log = logging.getLogger("execq.pipeline")
T = TypeVar("T")

FIRST_DELAY_S = 0.2
MAX_DELAY_S = 5.0


def while_store_down(call: Callable[[], T], *, wait_s: float, what: str) -> T:
    """`call()`, made again after each OperationalError (0.2 s, doubling to 5 s) until
    `wait_s` have passed; then the last error is raised."""
    deadline = time.monotonic() + wait_s
    delay = FIRST_DELAY_S
    while True:
        try:
            return call()
        except OperationalError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning(
                "store unreachable, %s again in %.1f s: %s", what, delay, type(exc).__name__
            )
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)
