"""`execq gateway`: the HTTP gateway for web backends in any language (FastAPI + uvicorn)."""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Annotated, Any

import typer

from workers.clikit import err, handled

if TYPE_CHECKING:
    import uvicorn

    from producer.settings import GatewaySettings

DEFAULT_PORT = 8080
APP = "workers.gateway.serve:app_from_env"
# On SIGTERM or Ctrl-C, requests in progress get this long to finish; then what is still open
# (event streams, which end only with their command) is cut, and clients resume elsewhere
# with Last-Event-ID. Without a bound, one open stream kept a stopping gateway up for as long
# as its command ran, and a service manager had to SIGKILL it.
SHUTDOWN_GRACE_S = 5


def uvicorn_config(options: GatewaySettings, app: Any = APP) -> uvicorn.Config:
    """How uvicorn serves the gateway (`app`: the import string of the factory, or an app)."""
    import uvicorn  # noqa: PLC0415

    return uvicorn.Config(
        app,
        factory=isinstance(app, str),
        host=options.host,
        port=options.port,
        workers=options.workers,
        # uvicorn's access lines are INFO; its own start-up chatter stays quiet below.
        log_level="info" if options.access_log else "warning",
        access_log=options.access_log,
        server_header=False,
        # Keep-alive connections of clients behind a pool outlive uvicorn's 5 s default.
        timeout_keep_alive=30,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )


@handled
def gateway(
    host: Annotated[
        str | None,
        typer.Option(
            metavar="ADDR",
            help="Address to listen on; 0.0.0.0: all (default 127.0.0.1).",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(metavar="PORT", min=1, max=65535, help=f"(default {DEFAULT_PORT})"),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            min=1,
            max=64,
            help="Processes serving requests, about one core each (default 1).",
        ),
    ] = None,
    max_body_kb: Annotated[
        int | None,
        typer.Option(
            metavar="KB",
            min=1,
            max=65536,
            help="Largest request body; 413 beyond (default 1024).",
        ),
    ] = None,
    token_cache_s: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            min=0,
            max=300,
            help="Trust a verified token this long without asking the store: a revoke "
            "takes up to this long to reach a running gateway; 0: ask each time (default 2).",
        ),
    ] = None,
    access_log: Annotated[
        bool | None,
        typer.Option(
            "--access-log/--no-access-log",
            help="Log each request: method, path, status, never a body (default on).",
        ),
    ] = None,
) -> None:
    """Serve the HTTP gateway: submit, follow and operate on commands with a tenant's token.

    OpenAPI at /openapi.json, interactive docs at /docs, /healthz without a token.
    Make a token with `execq token create --tenant T --scope submit,read`.
    Every option can also be set as EXECQ_GATEWAY_<OPTION>, e.g. EXECQ_GATEWAY_WORKERS=4.
    """
    import uvicorn  # noqa: PLC0415  (keeps every other command's start fast)
    from uvicorn.supervisors import Multiprocess  # noqa: PLC0415

    from producer.settings import load_gateway_settings  # noqa: PLC0415
    from workers.cli_show import load  # noqa: PLC0415

    # Options become the settings' variables: each worker process reads them from there.
    given = {
        "host": host,
        "port": port,
        "workers": workers,
        "max_body_kb": max_body_kb,
        "token_cache_s": token_cache_s,
        "access_log": access_log,
    }
    for name, value in given.items():
        if value is not None:
            os.environ[f"EXECQ_GATEWAY_{name.upper()}"] = str(value).lower()
    options = load_gateway_settings()
    _, tenants = load()  # refuse bad settings here, once, rather than in every worker
    ready = (
        f"execq gateway ready on http://{options.host}:{options.port} "
        f"(tenants: {', '.join(sorted(tenants.tenants)) or 'none'}; "
        f"{options.workers} process{'es' if options.workers > 1 else ''})"
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            # Only once the port is bound (a taken port exits before this, with the reason).
            if self.started and options.workers == 1:
                err.print(ready, highlight=False, soft_wrap=True)

    config = uvicorn_config(options)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    try:
        if options.workers == 1:
            Server(config).run()
        else:
            sock = config.bind_socket()
            err.print(ready, highlight=False, soft_wrap=True)
            Multiprocess(config, sockets=[sock]).run()
    except SystemExit as exc:
        # uvicorn exits 3 when it cannot start (port taken, say) and has logged why.
        raise typer.Exit(0 if exc.code in (0, None) else 1) from None
