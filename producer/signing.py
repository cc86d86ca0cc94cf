"""Signed messages: an HMAC-SHA256 over everything in a message that steers a worker.

Why HMAC and not Celery's `auth` serializer: `auth` signs only the serialized body — the
task id, name and headers (where the trace context travels) stay unsigned, there is no
expiry, and it needs a key pair and certificate store on every producer, worker, and on
Flower and the CLI just to send a revoke (control messages use the task serializer). Here
one shared key signs, per message: the task id (= command id), the task name, the kwargs
(command id, tenant, sealed secret values), and an expiry. Celery's remote-control revoke
and terminate are signed the same way (`sign_control`): a worker ignores an unsigned one,
which anyone who can publish to Redis could otherwise send (`execq flower` signs Flower's).

The trace headers (`traceparent`, `tracestate`) are not signed: Celery's OpenTelemetry
instrumentation rewrites them on publish, after execq has signed. They steer nothing but
tracing, and even there the store's trace id wins over the message's.

Rotating the key without refusing a message in flight: give the workers the new key as an
accepted one (`EXECQ_SIGNING_ACCEPTED_KEYS`), then every process the new key as its key and
the old one as accepted, then, after `EXECQ_MESSAGE_TTL_S`, drop the old one.

What it stops: a message made up by someone who can write to Redis (a new id, or a known id
with another body or tenant), and replays after the expiry. A replay before it is harmless:
the store lets only one delivery claim a command, and the spec that runs is always the
store's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

SIGNATURE = "execq_sig"
EXPIRES = "execq_exp"
VERSION = "v1"
# What a signed remote-control command (revoke, terminate) covers besides its expiry.
CONTROL = "control:{name}"


class BadSignature(ValueError):
    """A message that is unsigned, signed with another key, altered, or expired."""


def _payload(task_id: str, task: str, kwargs: Mapping[str, Any], exp: int) -> bytes:
    doc = {"id": task_id, "task": task, "kwargs": kwargs, "exp": exp}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Signer:
    """Signs outgoing and verifies incoming messages with the deployment's key."""

    def __init__(self, key: bytes, *, ttl_s: float, accepted: tuple[bytes, ...] = ()) -> None:
        """`accepted`: more keys a message may be signed with (a rotation in progress);
        only `key` signs."""
        self._key = key
        self._verifying = (key, *(k for k in accepted if k != key))
        self.ttl_s = ttl_s

    def _mac(self, payload: bytes, key: bytes | None = None) -> str:
        digest = hmac.new(key or self._key, payload, hashlib.sha256).hexdigest()
        return f"{VERSION}:{digest}"

    def sign(
        self,
        task_id: str,
        task: str,
        kwargs: Mapping[str, Any],
        *,
        not_before_s: float = 0.0,
    ) -> dict[str, Any]:
        """The headers to add: the signature and its expiry (later for a delayed message)."""
        exp = int(time.time() + not_before_s + self.ttl_s)
        payload = _payload(task_id, task, kwargs, exp)
        return {SIGNATURE: self._mac(payload), EXPIRES: exp}

    def verify(
        self,
        task_id: str | None,
        task: str,
        kwargs: Mapping[str, Any],
        headers: Mapping[str, Any],
    ) -> None:
        """Raise BadSignature (saying which check failed) unless the message is ours and fresh."""
        signature, exp = headers.get(SIGNATURE), headers.get(EXPIRES)
        if not isinstance(signature, str) or not signature:
            raise BadSignature("message is not signed")
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise BadSignature("message has no valid expiry")
        if not isinstance(task_id, str):
            raise BadSignature("message has no task id")
        try:
            payload = _payload(task_id, task, kwargs, exp)
        except (TypeError, ValueError):
            raise BadSignature("message body cannot be signed (not JSON)") from None
        # Every key is tried, a match or not, so the time taken says nothing of which one.
        matches = [hmac.compare_digest(self._mac(payload, k), signature) for k in self._verifying]
        if not any(matches):
            raise BadSignature("signature does not match (another key, or an altered message)")
        if exp < time.time():
            raise BadSignature(f"message expired {int(time.time() - exp)} s ago")

    def sign_control(self, name: str, task_ids: list[str], *, terminate: bool) -> dict[str, Any]:
        """The extra arguments that sign a remote-control `revoke`/`terminate` of `task_ids`."""
        return self.sign(",".join(task_ids), CONTROL.format(name=name), {"terminate": terminate})

    def verify_control(
        self, name: str, task_ids: list[str], *, terminate: bool, arguments: Mapping[str, Any]
    ) -> None:
        """BadSignature unless `arguments` sign exactly this command, ids and terminate flag."""
        self.verify(
            ",".join(task_ids), CONTROL.format(name=name), {"terminate": terminate}, arguments
        )


def signer_from_env() -> Signer | None:
    """The deployment's signer (EXECQ_SIGNING_KEY[_FILE]), or None when signing is off."""
    from producer.signing_settings import load_signing  # noqa: PLC0415 (read only where messages flow)

    settings = load_signing()
    key = settings.key()
    if key is None:
        return None
    return Signer(key, ttl_s=settings.message_ttl_s, accepted=settings.accepted_keys())
