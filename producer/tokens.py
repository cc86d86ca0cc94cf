"""API tokens of the HTTP gateway: made once, stored as a hash, checked on every request.

A token is `exq_`, 43 random characters (32 bytes from the OS's CSPRNG, in base62:
`0-9A-Za-z`, left-padded with `0`) and a 6-character checksum: the CRC32 of those 43 ASCII
characters, in base62, left-padded with `0`. It matches

    \\bexq_[0-9A-Za-z]{49}\\b

so a secret scanner can find a leaked token and check its checksum without a database, and
`verify` turns away a mistyped or made-up one before it asks the store. The store keeps only
the SHA-256 (hex) of the whole token; a token belongs to one tenant, carries scopes from
`SCOPES`, may expire, and is revoked by its public id (`tok_…`). Creating and revoking one are
operator events in the tenant's audit chain (subject: the token's id).
"""

from __future__ import annotations

import builtins
import hashlib
import re
import secrets
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, cast

from sqlalchemy import Connection, Table, insert, inspect, or_, select, update
from sqlalchemy.exc import IntegrityError

from producer.audit.events import NO_COMMAND_HASH, AuditEvent, Outcome, Phase, Subject, make_event
from producer.errors import DuplicateName, NotFound, SpecError, StoreError
from producer.identity import default_principal
from producer.store import audit as audit_sql
from producer.store.clock import as_utc, utcnow
from producer.store.models import Token
from producer.tenants import TENANT_NAME

if TYPE_CHECKING:
    from producer.audit.trail import Trail
    from producer.store.repository import Store

SCOPES: tuple[str, ...] = ("submit", "read", "operate")

PREFIX = "exq_"
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SECRET_BYTES = 32
BODY_CHARS = 43  # 62**43 > 2**256: every 32-byte value fits
CHECKSUM_CHARS = 6  # 62**6 > 2**32: every CRC32 fits
TOKEN_CHARS = len(PREFIX) + BODY_CHARS + CHECKSUM_CHARS
TOKEN_PATTERN = re.compile(rf"{PREFIX}[0-9A-Za-z]{{{BODY_CHARS + CHECKSUM_CHARS}}}")
ID_PREFIX = "tok_"
# A name is written into audit events and logs as a principal: no spaces or control characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+_-]{0,99}")
# verify records use at most this often per token: a write per request would cost more than
# the lookup, and "last used" to the minute is what an operator needs.
LAST_USED_EVERY = timedelta(seconds=60)

tokens_t = cast(Table, Token.__table__)
Status = Literal["active", "expired", "revoked"]


def _base62(value: int, width: int) -> str:
    digits = []
    while value:
        value, rest = divmod(value, 62)
        digits.append(ALPHABET[rest])
    return "".join(reversed(digits)).rjust(width, "0")


def checksum(body: str) -> str:
    """The 6-character checksum of a token's random part: CRC32 of its ASCII, in base62."""
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_CHARS)


def new_token() -> str:
    """A fresh token: the prefix, 32 random bytes in base62, and their checksum."""
    body = _base62(int.from_bytes(secrets.token_bytes(SECRET_BYTES), "big"), BODY_CHARS)
    return PREFIX + body + checksum(body)


def well_formed(raw: object) -> bool:
    """Whether `raw` looks like a token and its checksum matches (no database involved)."""
    if not isinstance(raw, str) or len(raw) != TOKEN_CHARS or not TOKEN_PATTERN.fullmatch(raw):
        return False
    body, check = raw[len(PREFIX) : -CHECKSUM_CHARS], raw[-CHECKSUM_CHARS:]
    # The checksum is public (anyone can compute it from the body): no secret to time here.
    return checksum(body) == check


def token_hash(raw: str) -> str:
    """What the store keeps of a token: SHA-256 of the whole token, hex."""
    return hashlib.sha256(raw.encode("ascii")).hexdigest()


def _new_id() -> str:
    return ID_PREFIX + secrets.token_hex(6)


@dataclass(frozen=True)
class TokenInfo:
    """Everything about a token but the token: what `list` shows and `verify` returns."""

    id: str
    tenant: str
    name: str
    scopes: frozenset[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def status(self, now: datetime | None = None) -> Status:
        """`revoked`, `expired` (its expiry has passed) or `active`."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or utcnow()):
            return "expired"
        return "active"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (times in ISO 8601), with the status as of now."""

        def iso(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "id": self.id,
            "tenant": self.tenant,
            "name": self.name,
            "scopes": [s for s in SCOPES if s in self.scopes],
            "status": self.status(),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "last_used_at": iso(self.last_used_at),
        }


def _info(row: Any) -> TokenInfo:
    created = as_utc(row.created_at)
    assert created is not None
    return TokenInfo(
        id=row.id,
        tenant=row.tenant,
        name=row.name,
        scopes=frozenset(row.scopes),
        created_at=created,
        expires_at=as_utc(row.expires_at),
        revoked_at=as_utc(row.revoked_at),
        last_used_at=as_utc(row.last_used_at),
    )


def check_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """The scopes as a set; SpecError naming an unknown one and the allowed ones."""
    if isinstance(scopes, str):
        scopes = [scopes]
    chosen = frozenset(scopes)
    unknown = sorted(s for s in chosen if s not in SCOPES)
    if unknown:
        raise SpecError(
            f"unknown token scope(s) {', '.join(map(repr, unknown))}: "
            f"the scopes are {', '.join(SCOPES)}"
        )
    if not chosen:
        raise SpecError(f"a token needs at least one scope of {', '.join(SCOPES)}")
    return chosen


def _check_tenant(tenant: str) -> str:
    if not tenant:
        raise SpecError("a token needs a tenant")
    if not TENANT_NAME.fullmatch(tenant):
        raise SpecError(f"tenant name {tenant!r} must match {TENANT_NAME.pattern}")
    return tenant


def _check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise SpecError(
            f"token name {name!r} must match {NAME_PATTERN.pattern} (it is the principal of "
            "the token's audit events)"
        )
    return name


class Tokens:
    """Create, verify, list and revoke API tokens in the results store."""

    def __init__(self, store: Store, *, trail: Trail | None = None) -> None:
        """`trail`: the sinks besides the store (the audit file) that token events go to."""
        self.store = store
        self.engine = store.engine
        self.trail = trail
        self._auto = store.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._pg = store.engine.dialect.name == "postgresql"
        if not inspect(self.engine).has_table("tokens"):
            raise StoreError(
                f"the results store {self.engine.url.render_as_string(hide_password=True)} "
                "has no tokens table: run `execq db upgrade` first"
            )

    def create(
        self,
        *,
        tenant: str,
        scopes: Iterable[str],
        name: str | None = None,
        expires_at: datetime | None = None,
        operator: str | None = None,
    ) -> tuple[TokenInfo, str]:
        """A new token of `tenant`: its info and the token itself, which nothing shows again.

        Raises SpecError for an empty or malformed tenant or name, an unknown scope or an
        expiry in the past, DuplicateName when the tenant has a token of that name already.
        """
        now = utcnow()
        expires = as_utc(expires_at)
        if expires is not None and expires <= now:
            raise SpecError(f"the token's expiry {expires.isoformat()} is in the past")
        token_id = _new_id()
        info = TokenInfo(
            id=token_id,
            tenant=_check_tenant(tenant),
            name=_check_name(name) if name is not None else f"token-{token_id}",
            scopes=check_scopes(scopes),
            created_at=now,
            expires_at=expires,
            revoked_at=None,
            last_used_at=None,
        )
        raw = new_token()
        event = _event(
            info,
            Phase.TOKEN_CREATE,
            operator,
            scopes=[s for s in SCOPES if s in info.scopes],
            expires_at=None if expires is None else expires.isoformat(),
        )
        row = {
            "id": info.id,
            "tenant": info.tenant,
            "name": info.name,
            "token_hash": token_hash(raw),
            "scopes": [s for s in SCOPES if s in info.scopes],
            "created_at": now,
            "expires_at": expires,
        }
        try:
            with self.engine.begin() as conn:
                self._refuse_taken(conn, info.tenant, info.name)
                conn.execute(insert(tokens_t), row)
                self._append(conn, info.tenant, event)
        except IntegrityError:
            # Two creates of one name at once: the loser gets the same answer as a later one.
            with self._auto.connect() as conn:
                self._refuse_taken(conn, info.tenant, info.name)
            raise
        self._copy([event])
        return info, raw

    def verify(self, raw: str) -> TokenInfo | None:
        """The token's info if it is well formed, known, unexpired and not revoked; else None.

        Never raises for what a client sends: a malformed token or one with a wrong checksum
        is turned away before the store is asked.
        """
        if not well_formed(raw):
            return None
        # Looked up by its hash, not compared: the database matches hashes, and how long that
        # takes tells nothing about a token nobody has (finding one with a given hash prefix
        # is finding SHA-256 preimages), so no constant-time comparison is needed.
        with self._auto.connect() as conn:
            row = conn.execute(
                select(tokens_t).where(tokens_t.c.token_hash == token_hash(raw))
            ).one_or_none()
            if row is None:
                return None
            info = _info(row)
            now = utcnow()
            if info.status(now) != "active":
                return None
            if info.last_used_at is None or now - info.last_used_at >= LAST_USED_EVERY:
                # Conditional, so that gateways verifying the same token at once write once.
                conn.execute(
                    update(tokens_t)
                    .where(
                        tokens_t.c.id == info.id,
                        or_(
                            tokens_t.c.last_used_at.is_(None),
                            tokens_t.c.last_used_at <= now - LAST_USED_EVERY,
                        ),
                    )
                    .values(last_used_at=now)
                )
                info = replace(info, last_used_at=now)
        return info

    def get(self, token_id: str) -> TokenInfo:
        """One token's info by id; raises NotFound."""
        with self._auto.connect() as conn:
            row = conn.execute(select(tokens_t).where(tokens_t.c.id == token_id)).one_or_none()
        if row is None:
            raise NotFound(f"no token {token_id!r}")
        return _info(row)

    def list(self, tenant: str | None = None) -> builtins.list[TokenInfo]:
        """Every token (or one tenant's), revoked and expired ones included, oldest first."""
        query = select(tokens_t).order_by(tokens_t.c.tenant, tokens_t.c.created_at, tokens_t.c.id)
        if tenant is not None:
            query = query.where(tokens_t.c.tenant == tenant)
        with self._auto.connect() as conn:
            return [_info(row) for row in conn.execute(query)]

    def revoke(self, token_id: str, *, operator: str | None = None) -> TokenInfo:
        """Revoke a token from now on; raises NotFound. Revoking a revoked token changes
        nothing (and records nothing)."""
        now = utcnow()
        with self.engine.begin() as conn:
            row = conn.execute(
                select(tokens_t).where(tokens_t.c.id == token_id).with_for_update()
            ).one_or_none()
            if row is None:
                raise NotFound(f"no token {token_id!r}")
            info = _info(row)
            if info.revoked_at is not None:
                return info
            info = replace(info, revoked_at=now)
            event = _event(info, Phase.TOKEN_REVOKE, operator)
            conn.execute(update(tokens_t).where(tokens_t.c.id == token_id).values(revoked_at=now))
            self._append(conn, info.tenant, event)
        self._copy([event])
        return info

    def _refuse_taken(self, conn: Connection, tenant: str, name: str) -> None:
        taken = conn.execute(
            select(tokens_t.c.id, tokens_t.c.revoked_at).where(
                tokens_t.c.tenant == tenant, tokens_t.c.name == name
            )
        ).one_or_none()
        if taken is not None:
            revoked = " (revoked)" if taken.revoked_at is not None else ""
            raise DuplicateName(
                f"tenant {tenant!r} already has a token named {name!r}: {taken.id}{revoked}; "
                "names stay unique so that audit events name one token: choose another"
            )

    def _append(self, conn: Connection, tenant: str, event: AuditEvent) -> None:
        """Append `event` to the tenant's chain inside the caller's transaction."""
        if self._pg:
            # The tenant may have no chain yet, and another writer may be making its head.
            audit_sql.ensure_head(conn, tenant)
        audit_sql.append_linked(conn, tenant, [event])

    def _copy(self, events: Sequence[AuditEvent]) -> None:
        if self.trail is not None:
            self.trail.copy(events)


def _event(info: TokenInfo, phase: Phase, operator: str | None, **detail: Any) -> AuditEvent:
    """An operator event about a token: its id is the subject, the operator the principal."""
    who = (operator or default_principal())[:200]
    subject = Subject(info.id, info.tenant, who, NO_COMMAND_HASH, None)
    return make_event(
        subject, phase, Outcome.OK, actor=who, operator=who, detail={"name": info.name, **detail}
    )
