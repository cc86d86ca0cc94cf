"""What keeps one caller from hurting the others: a body size limit and per-tenant rates."""

from __future__ import annotations

import math

import redis.asyncio as aioredis
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.ratelimit import BUCKET_SCRIPT
from producer.tenants import Tenant
from workers.gateway.errors import GatewayError, error_response

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: an argv, env and secrets never need more


class BodyLimit:
    """Answer 413 to a body over `limit` bytes, by Content-Length or as it streams in.

    Checked as the body arrives, so a client lying about (or leaving out) Content-Length
    cannot make the gateway buffer more than `limit`.
    """

    def __init__(self, app: ASGIApp, limit: int = DEFAULT_MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "Content-Length is not a number")(scope, receive, send)
                return
            if int(declared) > self.limit:
                await self._too_large(scope, receive, send)
                return
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking)
        except BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the body is larger than {self.limit} bytes"
        await error_response(413, message, max_bytes=self.limit)(scope, receive, send)


class BodyTooLarge(HTTPException):
    """Raised from `receive`: an HTTPException, so FastAPI's body parsing lets it through
    (it turns any other exception there into a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the body is larger than {limit} bytes")
        self.extra = {"max_bytes": limit}


class TenantRates:
    """Each tenant's `http_rate` bucket in Redis, shared by every gateway of the deployment.

    Redis unreachable: the request goes through (the store is the source of truth and
    accepts commands while Redis is down; a limiter that failed closed would turn a broker
    outage into refusals).
    """

    def __init__(self, client: aioredis.Redis, key_prefix: str) -> None:
        self._script = client.register_script(BUCKET_SCRIPT)
        self._prefix = key_prefix

    async def take(self, tenant: Tenant) -> None:
        """Raise a 429 GatewayError with Retry-After when the tenant's bucket is empty."""
        rate = tenant.http_rate
        if rate is None:
            return
        try:
            wait_ms = await self._script(
                keys=[f"{self._prefix}.{tenant.name}"], args=[rate.per_s, rate.burst]
            )
        except (aioredis.RedisError, OSError):
            return
        if wait_ms:
            raise too_many(
                f"tenant {tenant.name!r} sends more requests than its http_rate allows "
                f"({rate.per_s:g}/s, bursts of {rate.burst})",
                int(wait_ms) / 1000,
            )


def too_many(message: str, wait_s: float) -> GatewayError:
    """A 429 telling the client how long to wait (whole seconds, at least 1)."""
    retry_after = max(1, math.ceil(wait_s))
    return GatewayError(
        429, f"{message}; retry in {retry_after} s", headers={"Retry-After": str(retry_after)}
    )
