"""`execq flower`: Flower on the execq broker, never without authentication by accident."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from config.settings import Settings
from config.tenants import TenantsFile
from producer.broker import make_celery
from producer.errors import ConfigError

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
    # Flower reads its other FLOWER_* settings from the environment itself.
    app.start(["flower", f"--port={port}", f"--address={address}"])
