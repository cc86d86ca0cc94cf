"""Who is acting, when the caller does not say."""

from __future__ import annotations

import getpass
import os


def default_principal() -> str:
    """Who submits when the spec does not say: the service (OTEL_SERVICE_NAME) or OS user."""
    service = os.environ.get("OTEL_SERVICE_NAME", "").strip()
    if service:
        return service[:200]
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"
