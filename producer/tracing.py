"""Trace identity of a command: W3C trace context carried from submit into the child.

A submit inside an active OpenTelemetry span joins that trace; otherwise a new trace id is
made, so every record and child still carries one.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

try:  # optional at this layer: a web backend that traces has it installed
    from opentelemetry import trace as _otel_trace
except ImportError:  # pragma: no cover - depends on the environment
    _otel_trace = None

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True)
class TraceContext:
    """A trace id, the id of the span that is the parent, and the sampled flag."""

    trace_id: str
    span_id: str
    sampled: bool = True

    @property
    def traceparent(self) -> str:
        """The W3C `traceparent` header value."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def new_span_id() -> str:
    """A random, non-zero 64-bit span id in hex."""
    value = "0" * 16
    while value == "0" * 16:
        value = secrets.token_hex(8)
    return value


def current_or_new() -> TraceContext:
    """The active OpenTelemetry span's context when there is one, else a fresh trace."""
    if _otel_trace is not None:
        ctx = _otel_trace.get_current_span().get_span_context()
        if ctx.is_valid:
            return TraceContext(
                f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", bool(ctx.trace_flags & 1)
            )
    return TraceContext(secrets.token_hex(16), new_span_id())


def parse_traceparent(value: str | None) -> TraceContext | None:
    """A TraceContext from a `traceparent` value, or None if it is absent or malformed."""
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip())
    if match is None or match.group(1) == "0" * 32 or match.group(2) == "0" * 16:
        return None
    return TraceContext(match.group(1), match.group(2), match.group(3) == "01")
