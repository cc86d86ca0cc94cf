"""Who is acting, when the caller does not say."""

from __future__ import annotations

import getpass
import os
import pwd


def default_principal() -> str:
    """Who submits when the spec does not say: the service (OTEL_SERVICE_NAME) or OS user."""
    service = os.environ.get("OTEL_SERVICE_NAME", "").strip()
    if service:
        return service[:200]
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def os_identity() -> str:
    """The OS user running this process, as the system knows it (its real uid's name).

    Unlike `default_principal`, nothing the caller sets (USER, LOGNAME, OTEL_SERVICE_NAME)
    changes it, so it can tell two people apart: approvals rely on that.
    """
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # no passwd entry in some containers: the uid still names someone
        return f"uid:{uid}"
