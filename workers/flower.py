"""`execq flower`: Flower on the execq broker, never without authentication by accident."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Mapping
from typing import Any, cast

from tornado.routing import URLSpec
from tornado.web import HTTPError, RequestHandler, StaticFileHandler, authenticated

from producer.audit.trail import Trail
from producer.broker import make_celery, resolve_broker_url
from producer.errors import ConfigError, NotFound
from producer.revocation import revoke_remote
from producer.settings import Settings
from producer.signing import signer_from_env
from producer.store.db import make_engine, require_schema
from producer.store.repository import Store
from producer.tenants import TenantsFile

log = logging.getLogger("execq.flower")


def auth_mode(environ: Mapping[str, str]) -> str | None:
    """`basic`, `oauth`, or None when Flower would let anyone in."""
    basic = environ.get("FLOWER_BASIC_AUTH", "")
    if basic and all(":" in pair and pair.split(":", 1)[1] for pair in basic.split(",")):
        return "basic"
    if environ.get("FLOWER_AUTH_PROVIDER") and environ.get("FLOWER_AUTH"):
        return "oauth"
    return None


def run_flower(
    settings: Settings,
    tenants: TenantsFile,
    *,
    port: int,
    address: str,
    insecure_dev: bool,
) -> None:
    """Run Flower in this process until it is stopped; ConfigError when it would be open."""
    mode = auth_mode(os.environ)
    if os.environ.get("FLOWER_CONF"):
        raise ConfigError(
            "invalid setting FLOWER_CONF: execq flower reads no Flower configuration file; "
            "set Flower's options as FLOWER_* variables instead"
        )
    if mode is None and not insecure_dev:
        raise ConfigError(
            "Flower refuses to start without authentication: set FLOWER_BASIC_AUTH="
            "user:password (or FLOWER_AUTH_PROVIDER, FLOWER_AUTH and the OAuth settings), "
            "or pass --insecure-dev on a machine only you can reach"
        )
    if mode is None:
        log.warning("Flower runs WITHOUT authentication (--insecure-dev): anyone can revoke")
    app = make_celery(settings, tenants)
    _revokes_reach_the_store(app, settings)
    _every_path_needs_auth(required=mode is not None)
    # Flower reads its other FLOWER_* settings from the environment itself. Left to itself it
    # also executes ./flowerconfig.py, whose settings win over the environment's (it could
    # drop the authentication checked above): an empty file stands in for it.
    app.start(["flower", f"--port={port}", f"--address={address}", f"--conf={os.devnull}"])


GUARDED = "_execq_guarded"


def _every_path_needs_auth(*, required: bool) -> None:
    """Put Flower's own login check in front of every route, not only the ones it decorates.

    Flower checks credentials in its pages and API only: /metrics, /healthcheck, the static
    files and the not-found page answer anyone. Each route's handler becomes a subclass whose
    `prepare` runs the same check (Tornado's `authenticated` over Flower's `get_current_user`:
    401 for wrong or missing basic credentials, the login page for OAuth). Only the OAuth
    login page itself stays open. `required`: refuse every request if Flower ends up with
    no authentication configured after all.
    """
    from flower import urls  # type: ignore[import-untyped]  # noqa: PLC0415
    from flower.views.auth import LoginHandler  # type: ignore[import-untyped]  # noqa: PLC0415
    from flower.views.error import NotFoundErrorHandler  # type: ignore[import-untyped]  # noqa: PLC0415

    oauth_login = bool(os.environ.get("FLOWER_AUTH_PROVIDER"))
    routes: list[Any] = []
    for route in urls.handlers:
        handler = route.handler_class if isinstance(route, URLSpec) else route[1]
        if handler is LoginHandler:
            if oauth_login:
                routes.append(route)
                continue
            handler = NotFoundErrorHandler  # what Flower serves there without OAuth
        guarded = _guarded(handler, required=required)
        if isinstance(route, URLSpec):
            routes.append(URLSpec(route.regex.pattern, guarded, route.kwargs, route.name))
        else:
            routes.append((route[0], guarded, *route[2:]))
    # In place: Flower's application reads this very list when it is built.
    urls.handlers[:] = routes
    # Tornado adds its own routes for /static/, /favicon.ico and /robots.txt with this class.
    urls.settings["static_handler_class"] = _guarded(StaticFileHandler, required=required)


def _guarded(handler: type[RequestHandler], *, required: bool) -> type[RequestHandler]:
    """`handler` with Flower's authentication checked before any of its methods runs."""
    from flower.views import BaseHandler  # type: ignore[import-untyped]  # noqa: PLC0415

    if getattr(handler, GUARDED, False):
        return handler
    own_prepare = handler.prepare

    @authenticated
    def checked(self: RequestHandler) -> Awaitable[None] | None:
        return own_prepare(self)

    def prepare(self: RequestHandler) -> Awaitable[None] | None:
        options = getattr(self.application, "options", None)
        if required and not (getattr(options, "basic_auth", None) or getattr(options, "auth", "")):
            raise HTTPError(401, "Flower has no authentication configured")
        return checked(self)

    members: dict[str, Any] = {"prepare": prepare, GUARDED: True}
    if not issubclass(handler, BaseHandler):
        # Static files are served by Tornado's own handler, which knows no users.
        members["get_current_user"] = BaseHandler.get_current_user
    return cast("type[RequestHandler]", type(handler.__name__, (handler,), members))


def _revokes_reach_the_store(app: Any, settings: Settings) -> None:
    """Flower's Revoke and Terminate buttons also act on the store, from this process.

    Workers act on Celery's broadcast too, but only those running at that moment hear it:
    this way a command revoked while its tenant has no worker still never runs.
    """
    engine = make_engine(settings.database_url)
    require_schema(engine)
    store = Store(engine)
    trail = Trail.from_settings(settings)
    broker_url = resolve_broker_url(settings)
    control = app.control
    original = control.revoke
    signer = signer_from_env()

    def revoke(task_id: Any, destination: Any = None, terminate: bool = False, **kw: Any) -> Any:
        for command_id in [task_id] if isinstance(task_id, str) else list(task_id or []):
            try:
                rec = store.get(str(command_id))
                done = revoke_remote(
                    store,
                    trail,
                    rec,
                    settings=settings,
                    broker_url=broker_url,
                    actor=f"flower@{socket.gethostname()}",
                    operator="flower",
                    reason="revoked in Flower",
                    terminate=bool(terminate),
                )
                if done is not None:
                    log.warning("command %s %s in Flower", rec.id, done)
            except NotFound:
                pass  # not an execq command id: Celery's revoke alone
            except Exception:
                log.exception("Flower revoke of %s could not reach the store", command_id)
        if signer is not None:
            # Workers ignore a remote-control revoke that the deployment's key did not sign.
            ids = [str(i) for i in ([task_id] if isinstance(task_id, str) else task_id or [])]
            kw.update(signer.sign_control("revoke", ids, terminate=bool(terminate)))
        # Workers then drop the message (and, for execq, kill through the cancel flag).
        return original(task_id, destination=destination, terminate=terminate, **kw)

    control.revoke = revoke
