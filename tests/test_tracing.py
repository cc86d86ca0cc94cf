"""One trace from a web request through the queue and the worker into the child process."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import StatusCode

from producer import telemetry
from producer.client import Producer
from producer.errors import ConfigError
from producer.spec import CommandSpec
from producer.states import State
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.tokens import Tokens
from tests.conftest import Env, OtlpSink, start_gateway, start_worker
from tests.test_worker import Start, wait_for

ECHO_TRACE = ["/bin/sh", "-c", 'echo "$TRACEPARENT"; echo "${TRACESTATE:-none}"']


def spans_named(sink: OtlpSink, name: str, trace_id: str) -> list[dict]:
    return [s for s in sink.spans() if s["name"] == name and s["trace_id"] == trace_id]


@pytest.mark.slow
def test_a_web_request_trace_continues_through_the_worker_into_the_child(
    producer: Producer, workers: Start, otlp_sink: OtlpSink
) -> None:
    workers("alpha", extra_env=otlp_sink.env())
    # The web backend's own tracing; execq exports nothing in this process.
    web = TracerProvider().get_tracer("web")
    with web.start_as_current_span("GET /orders/42") as request_span:
        web_trace = f"{request_span.get_span_context().trace_id:032x}"
        r = producer.submit(CommandSpec(tenant="alpha", argv=ECHO_TRACE))
    rec = producer.wait(r.id, timeout=30)
    assert rec.state is State.SUCCEEDED
    assert rec.trace_id == web_trace
    traceparent = (rec.stdout or "").splitlines()[0]
    match = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", traceparent)
    assert match is not None and match.group(1) == web_trace
    # The child's parent is the worker's span, exported with its attributes.
    wait_for(lambda: spans_named(otlp_sink, "execq.run", web_trace), 15, "the worker span")
    run = spans_named(otlp_sink, "execq.run", web_trace)[0]
    assert run["span_id"] == match.group(2)
    attrs = run["attributes"]
    assert attrs["execq.tenant"] == "alpha" and attrs["execq.command_id"] == r.id
    assert attrs["execq.executable"] == "/bin/sh" and attrs["execq.exit_code"] == 0
    assert attrs["execq.state"] == "succeeded" and "execq.enforced.time" in attrs
    assert "execq.argv" not in attrs
    assert run["resource"]["service.name"] == "execq-worker"
    assert run["resource"]["execq.tenant"] == "alpha"
    # Celery's own span and the store's queries are in the same trace, without parameters.
    # Celery's span ends after execq's (it wraps the task), so it may come in a later export.
    wait_for(lambda: spans_named(otlp_sink, "run/execq.run", web_trace), 15, "Celery's span")
    in_trace = [s for s in otlp_sink.spans() if s["trace_id"] == web_trace]
    assert "run/execq.run" in {s["name"] for s in in_trace}
    queries = [s for s in in_trace if "db.statement" in s["attributes"]]
    assert any(s["attributes"]["db.statement"].startswith("UPDATE commands") for s in queries)
    assert not any(r.id in s["raw"] for s in queries)
    assert {e.trace_id for e in producer.audit_events(command_id=r.id)} == {web_trace}


@pytest.mark.slow
def test_a_failed_command_is_an_error_span_and_a_republished_one_keeps_its_trace(
    producer: Producer, workers: Start, otlp_sink: OtlpSink
) -> None:
    r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sh", "-c", "exit 4"]))
    rec = producer.get(r.id)
    # Lose the message: the reaper republishes it without any trace headers.
    producer.store.engine.dispose()
    import redis as redis_lib

    redis_lib.Redis.from_url(producer.broker_url).delete("execq.alpha")
    workers("alpha", extra_env={**otlp_sink.env(), "EXECQ_LEASE_S": "1"})
    done = producer.wait(r.id, timeout=90)
    assert done.state is State.FAILED
    wait_for(lambda: spans_named(otlp_sink, "execq.run", rec.trace_id or ""), 15, "the span")
    run = spans_named(otlp_sink, "execq.run", rec.trace_id or "")[0]
    assert run["status"] == StatusCode.ERROR.value
    assert run["status_message"] == "exit_code"


@pytest.mark.slow
def test_a_rollback_is_a_span_in_the_command_s_own_trace(
    producer: Producer, workers: Start, otlp_sink: OtlpSink
) -> None:
    workers("alpha", extra_env=otlp_sink.env())
    r = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/sh", "-c", "exit 5"],
            compensate=["/bin/sh", "-c", 'echo "$TRACEPARENT"'],
            rollback_on_failure=True,
        )
    )
    wait_for(lambda: producer.get(r.id).state is State.REVERTED, 30, "the rollback")
    rec = producer.get(r.id)
    trace_id = rec.trace_id or ""
    wait_for(lambda: spans_named(otlp_sink, "execq.compensate", trace_id), 15, "its span")
    span = spans_named(otlp_sink, "execq.compensate", trace_id)[0]
    assert span["attributes"]["execq.command_id"] == r.id
    assert span["attributes"]["execq.state"] == "reverted"
    # The compensation's child continues the same trace, under the compensation's span.
    assert rec.compensation is not None
    assert rec.compensation["stdout"].strip() == f"00-{trace_id}-{span['span_id']}-01"
    # The operator's rollback of another command joins that command's trace too.
    ok = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"], compensate=["/bin/true"]))
    producer.wait(ok.id, timeout=30)
    producer.rollback(ok.id, operator="alice")
    wait_for(lambda: producer.get(ok.id).state is State.REVERTED, 30, "the second rollback")
    second = producer.get(ok.id).trace_id or ""
    wait_for(lambda: spans_named(otlp_sink, "execq.compensate", second), 15, "its span")


def test_bad_otel_settings_are_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift"),
    ):
        with monkeypatch.context() as m:
            m.setenv("OTEL_TRACES_EXPORTER", "otlp")
            m.setenv(name, value)
            with pytest.raises(ConfigError, match=name):
                telemetry.exporter_name()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "2")
    with pytest.raises(ConfigError, match="OTEL_TRACES_SAMPLER_ARG"):
        telemetry.exporter_name()


def test_without_an_endpoint_nothing_is_exported_by_default() -> None:
    assert telemetry.exporter_name({}) == "none"
    assert telemetry.exporter_name({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == "otlp"
    assert telemetry.exporter_name({"OTEL_TRACES_EXPORTER": "console"}) == "console"
    grpc = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert telemetry.exporter_name(grpc) == "otlp"
    time.sleep(0)


@pytest.mark.slow
def test_spans_also_go_over_otlp_grpc(producer: Producer, workers: Start) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    names: list[str] = []

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request, context):  # type: ignore[no-untyped-def]
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    names.extend(span.name for span in ss.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        workers(
            "alpha",
            extra_env={
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_BSP_SCHEDULE_DELAY": "100",
            },
        )
        r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", "grpc"]))
        assert producer.wait(r.id, timeout=30).state is State.SUCCEEDED
        wait_for(lambda: "execq.run" in names, 15, "the span over gRPC")
    finally:
        server.stop(0)


def test_span_attributes_are_redacted_lists_included_and_none_dropped() -> None:
    from producer.redaction import Redactor
    from producer.tracing import clean_attributes

    redactor = Redactor({"TOKEN": "tok-9f8e7d6c5b"})
    attrs = clean_attributes(
        {
            "execq.argv": ["/usr/bin/curl", "-H", "X: tok-9f8e7d6c5b", "mail@example.com"],
            "execq.failure_reason": None,
            "execq.exit_code": 0,
        },
        redactor,
    )
    assert attrs == {
        "execq.argv": ["/usr/bin/curl", "-H", "X: [secret:TOKEN]", "mai***@***example.com"],
        "execq.exit_code": 0,
    }


def test_a_trace_execq_starts_is_sampled_as_the_deployment_s_ratio_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    from producer import tracing

    def with_env(**env: str) -> None:
        for name in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        tracing._sampler.cache_clear()

    with_env()
    assert all(tracing.current_or_new().sampled for _ in range(50))
    with_env(OTEL_TRACES_SAMPLER="parentbased_always_off")
    assert not any(tracing.current_or_new().sampled for _ in range(50))
    with_env(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0.3")
    sdk = TraceIdRatioBased(0.3)
    fresh = [tracing.current_or_new() for _ in range(2000)]
    for ctx in fresh:
        decision = sdk.should_sample(None, int(ctx.trace_id, 16), "x").decision
        assert ctx.sampled == decision.is_sampled()
    assert 0.25 < sum(c.sampled for c in fresh) / len(fresh) < 0.35
    tracing._sampler.cache_clear()


def test_a_producer_without_a_tracer_does_not_force_every_run_to_be_traced(
    producer: Producer, workers: Start, otlp_sink: OtlpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    from producer import tracing

    ratio = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}
    for name, value in ratio.items():
        monkeypatch.setenv(name, value)
    tracing._sampler.cache_clear()
    try:
        workers("alpha", extra_env={**otlp_sink.env(), **ratio})
        recs = [
            producer.wait(producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"])).id, 30)
            for _ in range(16)
        ]
        picked = {r.trace_id for r in recs if tracing.sampled_by_default(r.trace_id or "")}
        assert 0 < len(picked) < len(recs)
        wait_for(
            lambda: all(spans_named(otlp_sink, "execq.run", t) for t in picked),
            20,
            "the sampled commands' spans",
        )
        time.sleep(1)  # the batch processor's other exports, if any, have arrived
        traced = {s["trace_id"] for s in otlp_sink.spans() if s["name"] == "execq.run"}
        assert traced == picked
    finally:
        tracing._sampler.cache_clear()


def test_a_traceparent_on_an_http_request_continues_through_the_gateway_into_the_child(
    make_env: Callable[..., Env], tmp_path: Path, redis_url: str, otlp_sink: OtlpSink
) -> None:
    env = make_env(f"sqlite:///{tmp_path / 'gw.db'}", redis_url)
    upgrade(make_engine(env.settings.database_url))
    producer = env.producer()
    _, token = Tokens(producer.store).create(tenant="alpha", scopes=["submit", "read"])
    worker = start_worker(env, "alpha", extra_env=otlp_sink.env())
    gateway = start_gateway(env, extra_env=otlp_sink.env())
    web_trace, web_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    try:
        answer = httpx.post(
            f"{gateway.url}/v1/commands",
            json={"argv": ECHO_TRACE},
            headers={
                "Authorization": f"Bearer {token}",
                "traceparent": f"00-{web_trace}-{web_span}-01",
            },
            timeout=30,
        )
        assert answer.status_code == 201, answer.text
        rec = producer.wait(answer.json()["id"], timeout=30)
        assert rec.state is State.SUCCEEDED and rec.trace_id == web_trace
        child = (rec.stdout or "").splitlines()[0]
        assert re.fullmatch(rf"00-{web_trace}-[0-9a-f]{{16}}-01", child), child
        # The gateway's server span is the caller's span's child, exported by the gateway.
        wait_for(lambda: spans_named(otlp_sink, "POST /v1/commands", web_trace), 15, "its span")
        server = spans_named(otlp_sink, "POST /v1/commands", web_trace)[0]
        assert server["resource"]["service.name"] == "execq-gateway"
        assert server["parent_span_id"] == web_span
        assert "Bearer" not in server["raw"] and token not in server["raw"]
        wait_for(lambda: spans_named(otlp_sink, "execq.run", web_trace), 15, "the worker span")
    finally:
        gateway.stop()
        worker.stop()
        producer.close()
