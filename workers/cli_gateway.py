"""`execq gateway`: the HTTP gateway for web backends in any language (FastAPI + uvicorn)."""

from __future__ import annotations

import logging
import socket
from typing import Annotated

import typer

from workers.clikit import err, handled

DEFAULT_PORT = 8080


@handled
def gateway(
    host: Annotated[
        str, typer.Option(metavar="ADDR", help="Address to listen on (0.0.0.0: all).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", min=1, max=65535)] = DEFAULT_PORT,
    max_body_kb: Annotated[
        int,
        typer.Option(metavar="KB", min=1, max=65536, help="Largest request body (413 beyond)."),
    ] = 1024,
    token_cache_s: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            min=0,
            max=300,
            help="Trust a verified token this long without asking the store again: a revoke "
            "takes up to this long to reach a running gateway. 0: ask on every request.",
        ),
    ] = 2.0,
    access_log: Annotated[
        bool, typer.Option(help="Log each request (method, path, status; never a body).")
    ] = True,
) -> None:
    """Serve the HTTP gateway: submit, follow and operate on commands with a tenant's token.

    OpenAPI at /openapi.json, interactive docs at /docs, /healthz without a token.
    Make a token with `execq token create --tenant T --scope submit,read`.
    """
    import uvicorn  # noqa: PLC0415  (keeps every other command's start fast)

    from producer import telemetry  # noqa: PLC0415
    from producer.client import Producer  # noqa: PLC0415
    from workers.cli_show import load  # noqa: PLC0415
    from workers.gateway import create_app  # noqa: PLC0415

    settings, tenants = load()
    telemetry.configure(
        service_name="execq-gateway", attributes={"deployment.environment": settings.env.value}
    )
    producer = Producer.from_settings(settings, tenants)
    telemetry.instrument(engine=producer.store.engine)

    app = create_app(producer, max_body=max_body_kb * 1024, token_cache_s=token_cache_s)
    names = ", ".join(sorted(tenants.tenants)) or "none"

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            # Only once the port is bound (a taken port exits before this, with the reason).
            if self.started:
                err.print(
                    f"execq gateway ready on http://{host}:{port} (tenants: {names})",
                    highlight=False,
                )

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        # uvicorn's access lines are INFO; its own start-up chatter stays quiet below.
        log_level="info" if access_log else "warning",
        access_log=access_log,
        server_header=False,
        # Keep-alive connections of clients behind a pool outlive uvicorn's 5 s default.
        timeout_keep_alive=30,
    )
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    try:
        Server(config).run()
    except SystemExit as exc:
        # uvicorn exits 3 when it cannot start (port taken, say) and has logged why.
        raise typer.Exit(0 if exc.code in (0, None) else 1) from None
    finally:
        producer.close()
        telemetry.shutdown()
