"""Trace identity of a command: W3C trace context carried from submit into the child.

A submit inside an active OpenTelemetry span joins that trace; otherwise a new trace id is
made, so every record and child still carries one. Spans (`execq.submit`, `execq.run`) are
recorded when a tracer provider is installed (see `producer.telemetry`); their attributes
pass through the command's redactor.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace as _otel_trace
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceFlags, TraceState

from producer.redaction import Redactor

_TRACER = "execq"

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# W3C allows 32 list members of at most 256 chars each; anything else is dropped.
_TRACESTATE = re.compile(r"^[\x20-\x7e]{1,512}$")


@dataclass(frozen=True)
class TraceContext:
    """A trace id, the id of the span that is the parent, and the sampled flag."""

    trace_id: str
    span_id: str
    sampled: bool = True
    tracestate: str | None = None

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
    ctx = _otel_trace.get_current_span().get_span_context()
    if ctx.is_valid:
        return TraceContext(
            f"{ctx.trace_id:032x}",
            f"{ctx.span_id:016x}",
            bool(ctx.trace_flags & 1),
            ctx.trace_state.to_header() or None,
        )
    trace_id = secrets.token_hex(16)
    return TraceContext(trace_id, new_span_id(), sampled_by_default(trace_id))


def sampled_by_default(trace_id: str) -> bool:
    """The sampled flag of a trace execq starts itself (no span of the caller's to follow).

    The flag travels in the message and a worker's parent-based sampler obeys it, so it must
    be what this deployment's sampler would decide for a root span — not always "sampled",
    which would make a 10 % ratio trace everything a producer without OpenTelemetry submits.
    A ratio sampler decides by the trace id alone, so producer and worker agree.
    """
    kind, ratio = _sampler()
    if kind == "off":
        return False
    if kind == "ratio":
        from opentelemetry.sdk.trace.sampling import TraceIdRatioBased  # noqa: PLC0415

        bound = TraceIdRatioBased.get_bound_for_rate(ratio)
        return int(trace_id, 16) & TraceIdRatioBased.TRACE_ID_LIMIT < bound
    return True


@functools.cache
def _sampler() -> tuple[str, float]:
    """("on" | "off" | "ratio", ratio) from OTEL_TRACES_SAMPLER[_ARG], read once."""
    name = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if name.endswith("always_off"):
        return "off", 0.0
    if name.endswith("traceidratio"):
        try:
            ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            ratio = 1.0  # the telemetry settings refuse it at start; default meanwhile
        return "ratio", min(max(ratio, 0.0), 1.0)
    return "on", 1.0


def clean_attributes(values: Mapping[str, Any], redactor: Redactor | None) -> dict[str, Any]:
    """Span attributes without None values, every string through the redactor."""

    def clean(value: Any) -> Any:
        if isinstance(value, str) and redactor is not None:
            return redactor.scrub(value)[0]
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        return value

    return {key: clean(value) for key, value in values.items() if value is not None}


@contextmanager
def span(
    name: str,
    *,
    kind: SpanKind,
    parent: TraceContext | None = None,
    attributes: Mapping[str, Any] | None = None,
    redactor: Redactor | None = None,
) -> Iterator[Span]:
    """A current span: a child of the active span, or of `parent` (a remote context).

    Exceptions are not recorded on the span (their text could carry secrets); callers set
    an ERROR status with a reason that went through the redactor.
    """
    ctx = None
    current_ctx = _otel_trace.get_current_span().get_span_context()
    # The explicit parent wins unless the active span (Celery's own) is in the same trace.
    if parent is not None and (
        not current_ctx.is_valid or f"{current_ctx.trace_id:032x}" != parent.trace_id
    ):
        remote = SpanContext(
            int(parent.trace_id, 16),
            int(parent.span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(1 if parent.sampled else 0),
            trace_state=TraceState.from_header([parent.tracestate]) if parent.tracestate else None,
        )
        ctx = _otel_trace.set_span_in_context(NonRecordingSpan(remote), otel_context.Context())
    with _otel_trace.get_tracer(_TRACER).start_as_current_span(
        name,
        context=ctx,
        kind=kind,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        # Set once started, so an unsampled span (most of them) costs no redaction; the
        # samplers in use decide on the trace alone, never on attributes.
        if attributes and current.is_recording():
            current.set_attributes(clean_attributes(attributes, redactor))
        yield current


def finish_span(
    current: Span, attributes: Mapping[str, Any], *, error: str | None, redactor: Redactor | None
) -> None:
    """Final attributes of a span, and ERROR status with a (redacted) reason on failure."""
    if not current.is_recording():
        return
    current.set_attributes(clean_attributes(attributes, redactor))
    if error is not None:
        reason = redactor.scrub(error)[0] if redactor is not None else error
        current.set_status(Status(StatusCode.ERROR, reason))


def child_context(current: Span, fallback: TraceContext) -> TraceContext:
    """What the child process continues: this span when it is real, else `fallback`'s trace."""
    ctx = current.get_span_context()
    if ctx.is_valid and ctx.trace_id == int(fallback.trace_id, 16):
        return TraceContext(
            fallback.trace_id,
            f"{ctx.span_id:016x}",
            bool(ctx.trace_flags & 1),
            ctx.trace_state.to_header() or fallback.tracestate,
        )
    return TraceContext(fallback.trace_id, new_span_id(), fallback.sampled, fallback.tracestate)


def parse_traceparent(value: str | None, tracestate: str | None = None) -> TraceContext | None:
    """A TraceContext from a `traceparent` value, or None if it is absent or malformed.

    A `tracestate` is kept only when it looks like one (short, printable ASCII).
    """
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip())
    if match is None or match.group(1) == "0" * 32 or match.group(2) == "0" * 16:
        return None
    state = tracestate if tracestate and _TRACESTATE.match(tracestate) else None
    return TraceContext(match.group(1), match.group(2), match.group(3) == "01", state)
