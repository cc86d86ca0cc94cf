"""Who is asking: the bearer token, checked before anything else of a request is read."""

from __future__ import annotations

import time
from typing import Annotated

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from producer.client import Producer
from producer.tenants import Tenant
from producer.tokens import TokenInfo, Tokens, token_hash, well_formed
from workers.gateway.errors import GatewayError, error_response
from workers.gateway.limits import TenantRates

PROTECTED = "/v1/"


class Caller:
    """Who is asking: a valid token and its tenant's policy as this gateway loaded it."""

    def __init__(self, token: TokenInfo, tenant: Tenant) -> None:
        self.token = token
        self.tenant = tenant

    @property
    def name(self) -> str:
        return self.token.name

    def need(self, *scopes: str) -> None:
        if not self.token.scopes & set(scopes):
            wanted = " or ".join(scopes)
            raise GatewayError(403, f"this token lacks the {wanted} scope", scope=wanted)


bearer = HTTPBearer(
    auto_error=False,
    description="A tenant's token from `execq token create` (exq_…).",
)


class VerifiedTokens:
    """Tokens this gateway verified in the last `ttl_s` seconds, so a busy client costs one
    store lookup per `ttl_s` instead of one per request (1.4 ms of the gateway's ~7 ms of CPU
    per submit, measured). The price: a revoked token keeps working here for up to `ttl_s`.
    An expiry is checked on every request; only valid tokens are kept, and at most `MAX`.
    """

    MAX = 10_000

    def __init__(self, tokens: Tokens, ttl_s: float) -> None:
        self.tokens = tokens
        self.ttl_s = ttl_s
        self._seen: dict[str, tuple[float, TokenInfo]] = {}

    async def verify(self, raw: str) -> TokenInfo | None:
        if not well_formed(raw):
            return None  # garbage costs neither a thread nor a query
        key = token_hash(raw)
        now = time.monotonic()
        hit = self._seen.get(key)
        if hit is not None and hit[0] > now and hit[1].status() == "active":
            return hit[1]
        info = await anyio.to_thread.run_sync(self.tokens.verify, raw)
        if info is None or self.ttl_s <= 0:
            self._seen.pop(key, None)
            return info
        if len(self._seen) >= self.MAX:
            self._seen.pop(next(iter(self._seen)))  # the oldest entry
        self._seen[key] = (now + self.ttl_s, info)
        return info


class Gateway:
    """What every request of one app shares."""

    def __init__(
        self, producer: Producer, tokens: Tokens, rates: TenantRates, *, token_cache_s: float
    ) -> None:
        self.producer = producer
        self.tokens = VerifiedTokens(tokens, token_cache_s)
        self.rates = rates


async def authenticate(gateway: Gateway, authorization: str | None) -> Caller:
    """The token's caller, its tenant's rate taken; GatewayError 401, 403 or 429 otherwise."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise GatewayError(
            401,
            "missing token: send Authorization: Bearer exq_…",
            headers={"WWW-Authenticate": "Bearer"},
        )
    token = await gateway.tokens.verify(credentials.strip())
    if token is None:
        raise GatewayError(
            401,
            "invalid, expired or revoked token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    tenant = gateway.producer.tenants.get(token.tenant)
    if tenant is None:
        raise GatewayError(403, f"the token's tenant {token.tenant!r} is not configured")
    await gateway.rates.take(tenant)
    return Caller(token, tenant)


class Authenticate:
    """ASGI middleware: every /v1/ request carries a valid token, or gets its JSON error.

    Done here rather than only in a FastAPI dependency: FastAPI reads and validates the body
    before it runs dependencies, so a request with no token and a malformed body would be
    told 400 (and how its body is wrong) instead of 401.
    """

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or ()).get(b"authorization")
        try:
            who = await authenticate(self.gateway, header.decode("latin-1") if header else None)
        except GatewayError as exc:
            answer = error_response(exc.status, exc.message, exc.headers, **exc.extra)
            await answer(scope, receive, send)
            return
        scope.setdefault("state", {})["caller"] = who
        await self.app(scope, receive, send)


async def caller(
    request: Request,
    # Declared for OpenAPI's security scheme; Authenticate has checked it already.
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """The caller Authenticate found for this request."""
    who = getattr(request.state, "caller", None)
    if not isinstance(who, Caller):
        raise GatewayError(401, "missing token", headers={"WWW-Authenticate": "Bearer"})
    return who
