"""OpenTelemetry set-up from the standard `OTEL_*` variables, validated like any setting.

`OTEL_TRACES_EXPORTER` is `otlp` (`OTEL_EXPORTER_OTLP_PROTOCOL` http/protobuf, the default,
or grpc), `console` or `none`; when it is unset, execq exports over
OTLP only if an OTLP endpoint is configured (so an unconfigured host does not retry a
collector that is not there). Sampling is the SDK's (`OTEL_TRACES_SAMPLER`, default
parent-based always-on); spans go through a BatchSpanProcessor. A web backend that sets up
its own provider needs none of this: a submit inside its span joins its trace either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from producer.errors import ConfigError

log = logging.getLogger("execq.telemetry")

SAMPLERS = {
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
}
PROTOCOLS = {"http/protobuf", "grpc"}
_state: dict[str, Any] = {}


def exporter_name(environ: Mapping[str, str] | None = None) -> str:
    """The exporter the environment asks for; raises ConfigError naming a bad variable."""
    env = os.environ if environ is None else environ
    name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not name:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        name = "otlp" if endpoint else "none"
    if name not in {"otlp", "console", "none"}:
        raise ConfigError(
            f"invalid setting OTEL_TRACES_EXPORTER: must be otlp, console or none, got {name!r}"
        )
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if name == "otlp" and protocol not in PROTOCOLS:
        raise ConfigError(
            f"invalid setting OTEL_EXPORTER_OTLP_PROTOCOL: must be http/protobuf (port 4318) "
            f"or grpc (port 4317), got {protocol!r}"
        )
    sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if sampler not in SAMPLERS:
        raise ConfigError(
            f"invalid setting OTEL_TRACES_SAMPLER: must be one of {', '.join(sorted(SAMPLERS))}"
            f", got {sampler!r}"
        )
    arg = env.get("OTEL_TRACES_SAMPLER_ARG")
    if arg is not None and sampler.endswith("traceidratio"):
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(
                f"invalid setting OTEL_TRACES_SAMPLER_ARG: must be a ratio from 0 to 1, got {arg!r}"
            )
    return name


def configure(*, service_name: str, attributes: Mapping[str, str] | None = None) -> bool:
    """Install the global tracer provider for this process; False when nothing is exported.

    Idempotent per process (a forked child calls it again and gets its own provider).
    """
    name = exporter_name()
    if _state.get("pid") == os.getpid():
        return bool(_state.get("on"))
    _state.update(pid=os.getpid(), on=False)
    if name == "none":
        return False
    from opentelemetry import trace  # noqa: PLC0415  (only processes that export pay for it)
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    exporter: SpanExporter
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if name == "console":
        exporter = ConsoleSpanExporter()
    elif protocol == "grpc":
        # Created after fork in every pool process: a gRPC channel must not cross fork().
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as GrpcExporter,
        )

        exporter = GrpcExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter()
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override these defaults.
    resource = Resource.create({"service.name": service_name, **(attributes or {})})
    if os.environ.get("OTEL_SERVICE_NAME"):
        resource = resource.merge(Resource({"service.name": os.environ["OTEL_SERVICE_NAME"]}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _state.update(on=True, provider=provider)
    return True


def instrument(*, engine: Any = None, celery: bool = False) -> None:
    """Trace the store's queries (this engine), Redis calls and, in a worker, Celery's spans.

    Statements are recorded as SQL text with placeholders, never their parameters.
    """
    if not _state.get("on"):
        return
    from opentelemetry.instrumentation.redis import RedisInstrumentor  # noqa: PLC0415
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor  # noqa: PLC0415

    if engine is not None:
        # One instrumentor per engine: the instrumentor itself is a process-wide singleton.
        SQLAlchemyInstrumentor().instrument(engine=engine)
    if not RedisInstrumentor().is_instrumented_by_opentelemetry:
        RedisInstrumentor().instrument()
    if celery:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor  # noqa: PLC0415

        instrumentor = CeleryInstrumentor()  # type: ignore[no-untyped-call]
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()


def shutdown() -> None:
    """Flush and stop this process's exporter (at process exit)."""
    provider = _state.get("provider")
    if provider is not None and _state.get("pid") == os.getpid():
        try:
            provider.shutdown()
        except Exception as exc:  # an unreachable collector must not block a shutdown
            log.warning("could not flush spans: %s", exc)
