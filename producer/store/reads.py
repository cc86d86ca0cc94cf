"""The store's reads of commands: one record, lists, counts (Store mixes these in)."""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, String, Table, and_, func, or_, select
from sqlalchemy import cast as cast_

from producer.errors import NotFound
from producer.record import CommandRecord, TransitionRecord
from producer.states import State
from producer.store.clock import as_utc as _utc
from producer.store.ids import resolve, unique_prefixes
from producer.store.models import Command, Transition

commands = cast(Table, Command.__table__)
transitions = cast(Table, Transition.__table__)


@dataclass(frozen=True)
class Finished:
    """A finished command as the activity charts see it: its state, when, how long it ran."""

    state: State
    finished_at: datetime
    duration_s: float | None  # None: it never started (revoked or failed while pending)


class Reads:
    """Read-only queries; `_one` is the Store's connection for one statement."""

    def _one(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def lookup(self, command_id: str) -> tuple[str, str, bool] | None:
        """(tenant, state, held) of a command, or None: a cheap read for a delivery that
        claimed nothing (refused, a repeat, or throttled)."""
        with self._one() as conn:
            row = conn.execute(
                select(commands.c.tenant, commands.c.state, commands.c.held).where(
                    commands.c.id == command_id
                )
            ).one_or_none()
        return None if row is None else (row.tenant, row.state, bool(row.held))

    def attention_counts(self) -> dict[str, int]:
        """How many commands need a person, per tenant."""
        with self._one() as conn:
            rows = conn.execute(
                select(commands.c.tenant, func.count())
                .where(commands.c.needs_attention.is_(True))
                .group_by(commands.c.tenant)
            ).all()
        return {r[0]: int(r[1]) for r in rows}

    def resolve_id(self, id_or_prefix: str, *, tenant: str | None = None) -> str:
        """The full id of the command named by its id or a unique prefix of 8 characters or
        more (only among `tenant`'s commands, when given); NotFound or AmbiguousId."""
        where = None if tenant is None else commands.c.tenant == tenant
        with self._one() as conn:
            return resolve(conn, commands.c.id, id_or_prefix, what="command", where=where)

    def unique_prefixes(self, ids: Iterable[str]) -> dict[str, str]:
        """Each id's shortest prefix (8 characters or more) unique among every command, so
        any command taking an id takes it back."""
        with self._one() as conn:
            return unique_prefixes(conn, commands.c.id, ids)

    # --- reads ---------------------------------------------------------------------------

    def get(self, command_id: str, *, with_transitions: bool = False) -> CommandRecord:
        """The record of one command, or NotFound."""
        with self._one() as conn:
            row = conn.execute(select(commands).where(commands.c.id == command_id)).one_or_none()
            if row is None:
                raise NotFound(f"no command with id {command_id!r}")
            history: list[TransitionRecord] = []
            if with_transitions:
                for t in conn.execute(
                    select(transitions)
                    .where(transitions.c.command_id == command_id)
                    .order_by(transitions.c.id)
                ):
                    history.append(
                        TransitionRecord(
                            from_state=State(t.from_state) if t.from_state else None,
                            to_state=State(t.to_state),
                            version=t.version,
                            at=_utc(t.at) or t.at,
                            actor=t.actor,
                            reason=t.reason,
                        )
                    )
        return _record(row._mapping, history)

    def list(
        self,
        *,
        tenant: str | None = None,
        state: State | None = None,
        since: datetime | None = None,
        needs_attention: bool = False,
        batch_id: str | None = None,
        action: str | None = None,
        text: str | None = None,
        limit: int = 50,
        after: tuple[datetime, str] | None = None,
    ) -> list[CommandRecord]:
        """Newest first (a batch's steps in step order), optionally filtered.

        `after` is the (created_at, id) of the last record of a previous page: the page that
        follows it, stable while new commands arrive (keyset pagination, no OFFSET).
        `text`: only commands whose argv contains it (case-insensitive, as stored JSON).
        """
        if batch_id is not None:
            query = (
                select(commands)
                .where(commands.c.batch_id == batch_id)
                .order_by(commands.c.batch_step)
                .limit(limit)
            )
        else:
            query = (
                select(commands)
                .order_by(commands.c.created_at.desc(), commands.c.id.desc())
                .limit(limit)
            )
            if after is not None:
                at, last_id = after
                query = query.where(
                    or_(
                        commands.c.created_at < at,
                        and_(commands.c.created_at == at, commands.c.id < last_id),
                    )
                )
        if tenant is not None:
            query = query.where(commands.c.tenant == tenant)
        if state is not None:
            query = query.where(commands.c.state == state.value)
        if since is not None:
            query = query.where(commands.c.created_at >= since)
        if needs_attention:
            query = query.where(commands.c.needs_attention.is_(True))
        if action is not None:
            query = query.where(commands.c.action == action)
        if text:
            argv_text = func.lower(cast_(commands.c.argv, String))
            query = query.where(argv_text.contains(text.lower(), autoescape=True))
        with self._one() as conn:
            return [_record(r._mapping, []) for r in conn.execute(query)]

    def activity(
        self, tenant: str, since: datetime, *, limit: int = 100_000
    ) -> builtins.list[Finished]:
        """The tenant's commands created since `since` that have finished, oldest first: what
        the console's charts count. Bounded by the time window (the tenant, state and
        created_at index) and by `limit` rows."""
        query = (
            select(
                commands.c.state,
                commands.c.started_at,
                commands.c.finished_at,
            )
            .where(
                commands.c.tenant == tenant,
                commands.c.created_at >= since,
                commands.c.finished_at.is_not(None),
            )
            .order_by(commands.c.created_at)
            .limit(limit)
        )
        with self._one() as conn:
            rows = conn.execute(query).all()
        out = []
        for row in rows:
            finished = _utc(row.finished_at)
            assert finished is not None
            started = _utc(row.started_at)
            took = None if started is None else (finished - started).total_seconds()
            out.append(Finished(State(row.state), finished, took))
        return out

    def count(self) -> int:
        """How many commands the store holds."""
        with self._one() as conn:
            return int(conn.execute(select(func.count()).select_from(commands)).scalar_one())


_RECORD_FIELDS = tuple(f.name for f in fields(CommandRecord) if f.name != "transitions")
_TIMESTAMPS = frozenset(
    {
        "created_at",
        "updated_at",
        "started_at",
        "finished_at",
        "published_at",
        "lease_expires_at",
        "retry_at",
    }
)
_FLAGS = frozenset(
    {
        "output_truncated",
        "redacted",
        "retry_safe",
        "rollback_on_failure",
        "cancel_requested",
        "needs_attention",
        "held",
    }
)


def _record(m: Any, history: list[TransitionRecord]) -> CommandRecord:
    values: dict[str, Any] = {}
    for name in _RECORD_FIELDS:
        value = m[name]
        if name in _TIMESTAMPS:
            value = _utc(value)
        elif name in _FLAGS:
            value = bool(value)
        values[name] = value
    values["state"] = State(values["state"])
    values["secret_names"] = list(values["secret_names"] or [])
    values["env"] = dict(values["env"] or {})
    return CommandRecord(**values, transitions=history)
