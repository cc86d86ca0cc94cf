"""Settings and tenants: validated once at start, then passed in. Imports nothing from execq."""

from __future__ import annotations

from config.settings import ConfigInvalid, Environment, Settings, load_settings
from config.tenants import LimitCeilings, Tenant, TenantsFile, load_tenants

__all__ = [
    "ConfigInvalid",
    "Environment",
    "LimitCeilings",
    "Settings",
    "Tenant",
    "TenantsFile",
    "load_settings",
    "load_tenants",
]
