"""The HTTP gateway: execq for web backends in any language.

A FastAPI app over the same `Producer` the Python API is: the same policy, audit,
idempotency, signing and sealing. Callers authenticate with a tenant's token
(`execq token create`); the token's tenant is the tenant of everything it submits or sees,
and its name is the principal in audit events.
"""

from __future__ import annotations

from workers.gateway.app import create_app

__all__ = ["create_app"]
