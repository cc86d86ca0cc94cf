"""`execq flower`: Flower on the execq broker, never without authentication by accident."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

from config.settings import Settings
from config.tenants import TenantsFile
from producer.audit.trail import Trail
from producer.broker import make_celery, resolve_broker_url
from producer.errors import ConfigError, NotFound
from producer.revocation import revoke_remote
from producer.store.db import make_engine, require_schema
from producer.store.repository import Store

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
    # Flower reads its other FLOWER_* settings from the environment itself.
    app.start(["flower", f"--port={port}", f"--address={address}"])


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

    def revoke(task_id: Any, destination: Any = None, terminate: bool = False, **kw: Any) -> Any:
        for command_id in [task_id] if isinstance(task_id, str) else list(task_id or []):
            try:
                rec = store.get(str(command_id))
                done = revoke_remote(
                    store,
                    trail,
                    rec,
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
        # Workers then drop the message (and, for execq, kill through the cancel flag).
        return original(task_id, destination=destination, terminate=terminate, **kw)

    control.revoke = revoke
