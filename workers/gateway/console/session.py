"""The console's session: a signed cookie naming the signed-in token, with its CSRF token.

The cookie holds the token's id (never the token), when the session ends and a random CSRF
value, signed with HMAC-SHA256. Every request looks the token up again, so revoking or
expiring the token ends its sessions. Before sign-in the same cookie, without a token id,
carries the CSRF value of the sign-in form.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

COOKIE = "execq_console"
PATH = "/ui"
# How long a sign-in form stays valid before the user has signed in.
ANONYMOUS_TTL_S = 3600.0


@dataclass(frozen=True)
class Session:
    """What a console cookie says: the token (None before sign-in), its end and CSRF value."""

    token_id: str | None
    expires_at: float
    csrf: str

    def csrf_ok(self, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(self.csrf, sent or "")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Signs and checks session cookies with one key (configured, or random per process)."""

    def __init__(self, key: bytes | None, ttl_s: float) -> None:
        self._key = key if key else secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def encode(self, session: Session) -> str:
        body = {"t": session.token_id, "x": session.expires_at, "c": session.csrf}
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"{payload}.{self._sign(payload)}"

    def decode(self, value: str | None) -> Session | None:
        """The session a cookie value holds, or None if it is forged, garbled or over."""
        if not value or value.count(".") != 1:
            return None
        payload, signature = value.split(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            body = json.loads(_unb64(payload))
            session = Session(body["t"], float(body["x"]), str(body["c"]))
        except (binascii.Error, ValueError, KeyError, TypeError):
            return None
        if session.expires_at <= time.time():
            return None
        return session

    def read(self, request: Request) -> Session | None:
        return self.decode(request.cookies.get(COOKIE))

    def signed_in(self, token_id: str, token_expires_at: float | None) -> Session:
        """A new session (new CSRF value) for a token, ending no later than the token."""
        end = time.time() + self.ttl_s
        if token_expires_at is not None:
            end = min(end, token_expires_at)
        return Session(token_id, end, secrets.token_urlsafe(24))

    def anonymous(self) -> Session:
        return Session(None, time.time() + ANONYMOUS_TTL_S, secrets.token_urlsafe(24))

    def store(self, request: Request, response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            self.encode(session),
            max_age=max(1, int(session.expires_at - time.time())),
            path=PATH,
            httponly=True,
            samesite="strict",
            secure=is_https(request),
        )

    def clear(self, request: Request, response: Response) -> None:
        response.delete_cookie(
            COOKIE, path=PATH, httponly=True, samesite="strict", secure=is_https(request)
        )


def is_https(request: Request) -> bool:
    """Whether the browser speaks https to us (directly, or to the proxy in front)."""
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"
