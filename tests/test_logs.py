"""Log lines: one redacted JSON object each, tagged with the command they belong to."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from sqlalchemy.exc import OperationalError

from producer import logs
from producer.client import Producer
from producer.redaction import Redactor
from producer.spec import CommandSpec
from producer.states import State
from tests.conftest import WorkerProc
from workers.pipeline import Delivery
from workers.tasks import TaskCrashed, handle

SECRET = "hunter2-" + uuid.uuid4().hex
REQUIRED = {"ts", "level", "logger", "event", "trace_id", "span_id", "command_id", "tenant", "pid"}

Lines = Callable[[], list[dict[str, Any]]]


def _ours(handler: logging.Handler) -> bool:
    return isinstance(handler.formatter, structlog.stdlib.ProcessorFormatter)


@pytest.fixture
def buffer() -> Iterator[io.StringIO]:
    """Where configured logging writes; logging is put back as it was afterwards."""
    root = logging.getLogger()
    level = root.level
    yield io.StringIO()
    for handler in [h for h in root.handlers if _ours(h)]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


@pytest.fixture
def lines(buffer: io.StringIO) -> Lines:
    """Configure JSON logging into a buffer; calling the result parses every line written."""
    logs.configure(level="DEBUG", stream=buffer)
    return lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]


def secret_context(command_id: str = "cmd-1", **kwargs: Any) -> Any:
    return logs.command_context(
        command_id, tenant="acme", redactor=Redactor({"TOKEN": SECRET}), **kwargs
    )


def test_every_line_is_one_json_object_with_the_context_keys_null_when_unknown(
    lines: Lines,
) -> None:
    logging.getLogger("execq.test").info("plain %s", "line")
    [line] = lines()
    assert set(line) >= REQUIRED
    assert line["event"] == "plain line" and line["logger"] == "execq.test"
    assert line["level"] == "info" and line["ts"].endswith("Z") and "T" in line["ts"]
    assert all(line[k] is None for k in ("trace_id", "span_id", "command_id", "tenant"))
    assert "redacted" not in line


def test_a_stdlib_line_in_a_command_context_carries_its_ids_and_hides_the_secret(
    lines: Lines,
) -> None:
    with secret_context("cmd-1", trace_id="trace-1"):
        logs.bind(span_id="span-1")
        logging.getLogger("execq.pipeline").warning("env has %s", SECRET)
    [line] = lines()
    assert (line["command_id"], line["tenant"]) == ("cmd-1", "acme")
    assert (line["trace_id"], line["span_id"]) == ("trace-1", "span-1")
    assert line["event"] == "env has [secret:TOKEN]" and line["redacted"] is True
    assert SECRET not in json.dumps(line)


def test_an_exception_renders_its_traceback_without_the_secret(
    lines: Lines, buffer: io.StringIO
) -> None:
    log = logging.getLogger("execq.task")
    with secret_context():
        try:
            try:
                raise KeyError(SECRET)
            except KeyError as inner:
                raise ValueError(f"bad token {SECRET}") from inner
        except ValueError:
            log.exception("command failed with %s", SECRET)
    [line] = lines()
    assert "Traceback (most recent call last)" in line["exception"]
    assert "ValueError: bad token [secret:TOKEN]" in line["exception"]
    assert "KeyError: '[secret:TOKEN]'" in line["exception"]
    assert line["event"] == "command failed with [secret:TOKEN]" and line["redacted"] is True
    assert SECRET not in buffer.getvalue()


def test_structlog_loggers_render_the_same_way_values_included(
    lines: Lines, buffer: io.StringIO
) -> None:
    with secret_context():
        structlog.get_logger("execq.audit").info("sent", header=f"Bearer {SECRET}", n=[1, SECRET])
    [line] = lines()
    assert set(line) >= REQUIRED and line["logger"] == "execq.audit"
    assert line["header"] == "Bearer [secret:TOKEN]" and line["n"] == [1, "[secret:TOKEN]"]
    assert line["command_id"] == "cmd-1" and SECRET not in buffer.getvalue()


def test_the_context_is_gone_after_the_block_even_after_an_error(lines: Lines) -> None:
    log = logging.getLogger("execq.test")
    with pytest.raises(RuntimeError), secret_context():
        logs.bind(trace_id="trace-1", attempt=2)
        raise RuntimeError("inside")
    log.info("outside %s", SECRET)
    [line] = lines()
    assert all(line[k] is None for k in ("trace_id", "span_id", "command_id", "tenant"))
    assert "attempt" not in line
    # No command is active: its secret is no longer known, so nothing is replaced.
    assert line["event"] == f"outside {SECRET}" and "redacted" not in line


def test_threads_do_not_see_each_others_context(lines: Lines) -> None:
    log = logging.getLogger("execq.test")
    both_inside = threading.Barrier(2)

    def work(command_id: str) -> None:
        with logs.command_context(command_id, tenant=f"tenant-{command_id}"):
            both_inside.wait(5)
            log.info("running %s", command_id)
            both_inside.wait(5)

    threads = [threading.Thread(target=work, args=(c,)) for c in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    log.info("main")
    found = {line["event"]: (line["command_id"], line["tenant"]) for line in lines()}
    assert found == {
        "running a": ("a", "tenant-a"),
        "running b": ("b", "tenant-b"),
        "main": (None, None),
    }


def test_third_party_loggers_render_as_json_too(lines: Lines) -> None:
    logging.getLogger("celery.worker").info("Connected to redis://localhost")
    logging.getLogger("kombu.connection").warning("retrying")
    got = [(line["logger"], line["level"], line["event"]) for line in lines()]
    assert got == [
        ("celery.worker", "info", "Connected to redis://localhost"),
        ("kombu.connection", "warning", "retrying"),
    ]
    assert all(set(line) >= REQUIRED for line in lines())


def test_celery_task_lines_name_the_command_they_are_about(lines: Lines) -> None:
    data = {"id": "cmd-9", "name": "execq.run", "runtime": 0.1}
    logging.getLogger("celery.app.trace").info(
        "Task %(name)s[%(id)s] succeeded in %(runtime)ss", data, extra={"data": data}
    )
    [line] = lines()
    assert (
        line["command_id"] == "cmd-9" and line["event"] == "Task execq.run[cmd-9] succeeded in 0.1s"
    )
    assert "data" not in line


def test_configuring_twice_or_after_basic_config_writes_each_line_once(
    buffer: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    plain = logging.StreamHandler(sys.stderr)
    root.addHandler(plain)
    try:
        logs.configure(stream=buffer)
        logs.configure(stream=buffer)
        logging.getLogger("execq.test").warning("once")
    finally:
        root.removeHandler(plain)
    assert [json.loads(x)["event"] for x in buffer.getvalue().splitlines()] == ["once"]
    assert capsys.readouterr().err == ""


def test_the_level_filters_lines(buffer: io.StringIO) -> None:
    logs.configure(level="WARNING", stream=buffer)
    logging.getLogger("execq.test").info("hidden")
    structlog.get_logger("execq.test").info("hidden too")
    logging.getLogger("execq.test").warning("shown")
    assert [json.loads(x)["event"] for x in buffer.getvalue().splitlines()] == ["shown"]


def test_a_bad_log_call_writes_a_line_instead_of_raising(
    lines: Lines, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # pytest's own capture handler would turn the bad call below into a test error.
    monkeypatch.setattr(logging, "raiseExceptions", False)

    class Unprintable:
        def __repr__(self) -> str:
            raise RuntimeError(SECRET)

    log = logging.getLogger("execq.test")
    log.info("two %s %s", "only-one")  # noqa: PLE1206
    with secret_context():
        structlog.get_logger("execq.test").info("odd", value=Unprintable(), ratio=float("nan"))
    first, second = lines()
    assert first["event"].startswith("log record could not be rendered") and "only-one" not in (
        json.dumps(first)
    )
    assert set(first) >= REQUIRED
    assert second["value"].startswith("<unrepresentable Unprintable") and second["ratio"] == "nan"
    assert capsys.readouterr().err == ""


def test_the_console_format_is_readable_and_still_redacted(buffer: io.StringIO) -> None:
    logs.configure(json=False, stream=buffer)
    with secret_context():
        try:
            raise ValueError(SECRET)
        except ValueError:
            logging.getLogger("execq.test").exception("failed")
    text = buffer.getvalue()
    assert not text.startswith("{") and "failed" in text and "command_id=cmd-1" in text
    assert "ValueError: [secret:TOKEN]" in text and SECRET not in text
    assert "trace_id" not in text


# --- the task's crash path ----------------------------------------------------------------


def fake_runtime(handle_delivery: Callable[[Delivery], Any]) -> Callable[[], Any]:
    runtime = SimpleNamespace(
        pipeline=SimpleNamespace(handle=lambda delivery, _redactor=None: handle_delivery(delivery)),
        config=SimpleNamespace(tenant=SimpleNamespace(masking="L1")),
    )
    return lambda: runtime


def test_a_crashing_task_logs_a_redacted_traceback_and_raises_no_secret(
    lines: Lines, buffer: io.StringIO
) -> None:
    command_id = str(uuid.uuid4())
    delivery = Delivery(command_id, "acme", {"TOKEN": SECRET}, None)

    def crash(d: Delivery) -> Any:
        raise ValueError(f"spec {d.secrets} env {{'TOKEN': '{SECRET}'}}")

    with pytest.raises(TaskCrashed) as raised:
        handle(fake_runtime(crash), delivery)
    assert str(raised.value) == f"command {command_id} crashed: ValueError"
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    [line] = lines()
    assert line["command_id"] == command_id and line["tenant"] == "acme"
    assert line["level"] == "error" and line["redacted"] is True
    assert "ValueError: spec {'TOKEN': '[secret:TOKEN]'}" in line["exception"]
    assert SECRET not in buffer.getvalue()
    logging.getLogger("execq.test").info("after")
    assert lines()[-1]["command_id"] is None


def test_a_store_outage_in_a_task_is_logged_redacted_and_not_raised(
    lines: Lines, buffer: io.StringIO
) -> None:
    command_id = str(uuid.uuid4())

    def outage(_: Delivery) -> Any:
        raise OperationalError("UPDATE commands SET stdout=?", (SECRET,), Exception("locked"))

    delivery = Delivery(command_id, "acme", {"TOKEN": SECRET}, None)
    assert handle(fake_runtime(outage), delivery) == "store_unavailable"
    [line] = lines()
    assert line["command_id"] == command_id and "[secret:TOKEN]" in line["event"]
    assert SECRET not in buffer.getvalue()


def test_a_handled_delivery_leaves_the_pipelines_bound_ids_behind(lines: Lines) -> None:
    def traced(d: Delivery) -> Any:
        logs.bind(trace_id="trace-7", span_id="span-7")
        logging.getLogger("execq.pipeline").info("claimed %s", d.command_id)
        return SimpleNamespace(action="ran")

    assert handle(fake_runtime(traced), Delivery("cmd-7", "acme", {}, None)) == "ran"
    logging.getLogger("execq.test").info("next")
    inside, after = lines()
    assert (inside["command_id"], inside["trace_id"], inside["span_id"]) == (
        "cmd-7",
        "trace-7",
        "span-7",
    )
    assert (after["command_id"], after["trace_id"], after["span_id"]) == (None, None, None)


# --- a real worker --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_workers_log_lines_are_json_and_name_the_command(
    producer: Producer, workers: Callable[..., WorkerProc]
) -> None:
    w = workers("alpha")
    r = producer.submit(
        CommandSpec(
            tenant="alpha",
            secrets={"API_TOKEN": SECRET},
            argv=["/bin/sh", "-c", 'echo "$API_TOKEN"'],
        )
    )
    assert producer.wait(r.id, timeout=30).state is State.SUCCEEDED
    w.stop()
    output = w.output()
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert records, output[-3000:]
    assert all(set(rec) >= REQUIRED for rec in records)
    assert any(rec["command_id"] == r.id for rec in records), output[-3000:]
    assert SECRET not in output
