"""Structured, redacted logs: one JSON object per line, whoever logs (execq, Celery, kombu).

Every line carries `trace_id`, `span_id`, `command_id` and `tenant` (null when unknown), and
passes through the current command's Redactor last, traceback and message included.
"""

from __future__ import annotations

import contextvars
import json as jsonlib
import logging
import math
import os
import sys
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog
from structlog.stdlib import ProcessorFormatter
from structlog.typing import EventDict, Processor, WrappedLogger

from producer.broker import TASK_NAME
from producer.redaction import Redactor

__all__ = ["bind", "command_context", "configure", "is_configured", "unbind"]

CONTEXT_KEYS = ("trace_id", "span_id", "command_id", "tenant")
# Keys first in every line, in this order; the rest follow as logged.
_LEADING = ("ts", "level", "logger", "event", *CONTEXT_KEYS, "pid")
# Deeper structures are cut: a self-referencing value must not hang the logger.
_MAX_DEPTH = 8

_redactor: contextvars.ContextVar[Redactor | None] = contextvars.ContextVar(
    "execq_log_redactor", default=None
)
_fallback: list[Redactor] = []
_configured: list[bool] = []


def configure(*, level: str = "INFO", json: bool = True, stream: TextIO | None = None) -> None:
    """Route stdlib logging and structlog through one redacting renderer (safe to repeat)."""
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
        final: list[Processor] = []
    else:
        out = stream or sys.stderr
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(out), timestamp_key="ts")
        final = [_drop_unknown_context]
    formatter = _SafeFormatter(
        foreign_pre_chain=[*_stamp_chain(), _celery_task_id],
        processors=[
            ProcessorFormatter.remove_processors_meta,
            _context_defaults,
            _stack_text,
            structlog.processors.format_exc_info,
            _shape,
            # Last before rendering: nothing added after this point escapes scrubbing.
            _redact,
            *final,
            renderer,
        ],
    )
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _Handler) or _is_plain_console_handler(old):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_level_number(level))
    logging.captureWarnings(True)
    _configured[:] = [True]
    structlog.configure(
        processors=[
            _Guarded(
                [
                    structlog.stdlib.filter_by_level,
                    *_stamp_chain(),
                    structlog.stdlib.PositionalArgumentsFormatter(),
                ]
            ),
            ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def is_configured() -> bool:
    """Whether `configure` ran in this process (a CLI entry point chose the format)."""
    return bool(_configured)


def bind(**kv: Any) -> None:
    """Add keys to every line this thread (or task) logs until unbound or its context ends."""
    structlog.contextvars.bind_contextvars(**kv)


def unbind(*keys: str) -> None:
    """Remove keys bound with `bind` or `command_context`."""
    structlog.contextvars.unbind_contextvars(*keys)


@contextmanager
def command_context(
    command_id: str,
    *,
    tenant: str | None = None,
    trace_id: str | None = None,
    span_id: str | None = None,
    redactor: Redactor | None = None,
) -> Iterator[None]:
    """Tag and scrub every line logged in the block; keys bound inside are dropped on exit."""
    before = structlog.contextvars.get_contextvars()
    token = _redactor.set(redactor)
    structlog.contextvars.bind_contextvars(
        command_id=command_id, tenant=tenant, trace_id=trace_id, span_id=span_id
    )
    try:
        yield
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**before)
        try:
            _redactor.reset(token)
        except ValueError:  # exited in another context than entered (generator cleanup)
            _redactor.set(None)


# --- processors ------------------------------------------------------------------------


def _stamp_chain() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _timestamp,
    ]


def _timestamp(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """ISO 8601 UTC; a stdlib record keeps the time it was made, not the time it was written."""
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        event_dict["ts"] = _iso(datetime.fromtimestamp(record.created, UTC))
        event_dict["pid"] = record.process or os.getpid()
    else:
        event_dict["ts"] = _iso(datetime.now(UTC))
        event_dict["pid"] = os.getpid()
    return event_dict


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _celery_task_id(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Celery's own task lines ("received", "succeeded") name the task id: the command id."""
    record = event_dict.get("_record")
    data = getattr(record, "data", None)
    if (
        event_dict.get("command_id") is None
        and isinstance(data, Mapping)
        and data.get("name") == TASK_NAME
        and isinstance(data.get("id"), str)
    ):
        event_dict["command_id"] = data["id"]
    return event_dict


def _context_defaults(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key in CONTEXT_KEYS:
        event_dict.setdefault(key, None)
    event_dict.setdefault("pid", os.getpid())
    return event_dict


def _stack_text(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """A stdlib record brings its stack as text; structlog's `stack_info=True` asks for one."""
    stack = event_dict.pop("stack_info", None)
    if isinstance(stack, str):
        event_dict["stack"] = stack
    elif stack:
        event_dict["stack"] = "".join(traceback.format_stack()[:-1])
    return event_dict


def _shape(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    shaped: EventDict = {key: event_dict.pop(key) for key in _LEADING if key in event_dict}
    shaped.update(event_dict)
    return shaped


def _redact(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Scrub every string (keys, values, nested, reprs) with the current command's Redactor."""
    try:
        scrubber = _Scrubber(_redactor.get() or _default_redactor())
        cleaned = {scrubber.key(k): scrubber.value(v, 0) for k, v in event_dict.items()}
        if scrubber.changed:
            cleaned["redacted"] = True
        return cleaned
    except Exception as exc:
        # Unscrubbed text must not be written: keep only what cannot hold a secret.
        return _minimal(event_dict, f"log line withheld: redaction failed ({type(exc).__name__})")


def _drop_unknown_context(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key in CONTEXT_KEYS:
        if event_dict.get(key) is None:
            event_dict.pop(key, None)
    return event_dict


class _Scrubber:
    """Turns an event dict's values into scrubbed JSON-safe values, noting any replacement."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.changed = False

    def text(self, value: str) -> str:
        result, hit = self.redactor.scrub(value)
        self.changed = self.changed or hit
        return result if result is not None else ""

    def key(self, key: object) -> str:
        return self.text(key if isinstance(key, str) else _safe_repr(key))

    def value(self, value: object, depth: int) -> object:
        if value is None or isinstance(value, bool | int):
            return value
        if isinstance(value, float):
            # NaN and infinities are not JSON.
            return value if math.isfinite(value) else repr(value)
        if isinstance(value, str):
            return self.text(value)
        if depth < _MAX_DEPTH:
            if isinstance(value, Mapping):
                return {self.key(k): self.value(v, depth + 1) for k, v in value.items()}
            if isinstance(value, Sequence | set | frozenset) and not isinstance(
                value, bytes | bytearray
            ):
                return [self.value(v, depth + 1) for v in value]
        # Scrub the repr here: the renderer would otherwise repr it after redaction.
        return self.text(_safe_repr(value))


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception as exc:
        return f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"


def _default_redactor() -> Redactor:
    if not _fallback:
        _fallback.append(Redactor({}))
    return _fallback[0]


def _minimal(event_dict: Mapping[str, Any], event: str) -> EventDict:
    """The keys every line has, from values that cannot carry a secret."""
    line: EventDict = {}
    for key in ("ts", "level", "logger"):
        value = event_dict.get(key)
        line[key] = value if isinstance(value, str) else None
    line["event"] = event
    for key in CONTEXT_KEYS:
        value = event_dict.get(key)
        line[key] = value if isinstance(value, str) else None
    line["pid"] = os.getpid()
    return line


class _Guarded:
    """Runs structlog's own processors so that a failing one degrades the line, not the call."""

    def __init__(self, processors: list[Processor]) -> None:
        self.processors = processors

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        try:
            for processor in self.processors:
                event_dict = processor(logger, name, event_dict)  # type: ignore[assignment]
            return event_dict
        except structlog.DropEvent:
            raise
        except Exception as exc:
            line = _minimal(event_dict, f"log call failed: {type(exc).__name__}")
            line["level"] = name
            line["logger"] = getattr(logger, "name", None)
            return line


# --- stdlib plumbing ---------------------------------------------------------------------


class _SafeFormatter(ProcessorFormatter):
    """A record that cannot be rendered becomes a minimal JSON line instead of an error."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            return super().format(record)
        except Exception as exc:
            try:
                context = structlog.contextvars.get_contextvars()
                line = _minimal(
                    {**context, "level": record.levelname.lower(), "logger": record.name},
                    f"log record could not be rendered: {type(exc).__name__}",
                )
                line["ts"] = _iso(datetime.now(UTC))
                if isinstance(record.msg, str):
                    scrubber = _Scrubber(_redactor.get() or _default_redactor())
                    line["template"] = scrubber.text(record.msg)
                    if scrubber.changed:
                        line["redacted"] = True
                return jsonlib.dumps(line)
            except Exception:
                return '{"event": "log record could not be rendered"}'


class _Handler(logging.StreamHandler[TextIO]):
    """The one handler `configure` installs on the root logger."""

    def handleError(self, record: logging.LogRecord) -> None:
        # The stdlib prints the record's arguments (secrets included) to stderr; a broken
        # stream is no reason to stop a worker either.
        return


def _is_plain_console_handler(handler: logging.Handler) -> bool:
    """What `logging.basicConfig` installs: it would print every line a second time, unredacted."""
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (
        sys.stderr,
        sys.stdout,
        sys.__stderr__,
        sys.__stdout__,
    )


def _level_number(level: str) -> int:
    name = str(level).strip().upper()
    if name.isdigit():
        return int(name)
    number = logging.getLevelName(name)
    return number if isinstance(number, int) else logging.INFO


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except Exception:
        return False
