"""The gateway as one process of `execq gateway` runs it: settings from the environment.

`app_from_env` is what each uvicorn worker process calls after it starts (`--workers N`):
the producer, its store engine and Redis connections are made in the process that uses
them, never inherited across a fork.
"""

from __future__ import annotations

from fastapi import FastAPI

from producer import telemetry
from producer.client import Producer
from producer.settings import load_gateway_settings, load_settings
from producer.tenants import load_tenants
from workers.gateway.app import create_app


def app_from_env() -> FastAPI:
    """The gateway app from the EXECQ_* settings; its producer closes with the app."""
    settings = load_settings()
    options = load_gateway_settings()
    tenants = load_tenants(settings.tenants_file)
    telemetry.configure(
        service_name="execq-gateway", attributes={"deployment.environment": settings.env.value}
    )
    producer = Producer.from_settings(settings, tenants)
    telemetry.instrument(engine=producer.store.engine)
    return create_app(
        producer,
        max_body=options.max_body_kb * 1024,
        token_cache_s=options.token_cache_s,
        close_producer=True,
        session_key=(
            options.session_key.get_secret_value().encode() if options.session_key else None
        ),
        session_ttl_s=options.session_ttl_s,
    )
