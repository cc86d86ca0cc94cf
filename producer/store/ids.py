"""A row named by its id or by a unique prefix of it (8 characters at least), as operators
type them: `execq status 3f2a91c0` for 3f2a91c0-5b1e-4c4e-9a43-6f0d2b7e8a19."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Column, ColumnElement, Connection, String, literal, select, union_all

from producer.errors import AmbiguousId, NotFound

MIN_PREFIX = 8
SHOWN = 5  # candidates an ambiguous prefix lists
PER_STATEMENT = 100  # ids whose neighbours one statement looks up


def resolve(
    conn: Connection,
    column: Column[Any],
    id_or_prefix: str,
    *,
    what: str,
    where: ColumnElement[bool] | None = None,
) -> str:
    """The one id in `column` equal to `id_or_prefix` or beginning with it; NotFound when
    none does (or the prefix is too short to look up), AmbiguousId when several do.

    The exact id is looked up first (by the primary key); only a miss scans by prefix.
    """
    exact = select(column).where(column == id_or_prefix)
    if where is not None:
        exact = exact.where(where)
    if conn.execute(exact).first() is not None:
        return id_or_prefix
    if len(id_or_prefix) < MIN_PREFIX:
        raise NotFound(
            f"no {what} with id {id_or_prefix!r} (an id prefix needs at least "
            f"{MIN_PREFIX} characters)"
        )
    query = select(column).where(column.startswith(id_or_prefix, autoescape=True))
    if where is not None:
        query = query.where(where)
    found = conn.execute(query.order_by(column).limit(SHOWN + 1)).scalars().all()
    # SQLite's LIKE ignores case; ids are compared as they are written.
    matches = [str(m) for m in found if str(m).startswith(id_or_prefix)]
    if not matches:
        raise NotFound(f"no {what} with id {id_or_prefix!r}")
    if len(matches) > 1:
        shown = ", ".join(matches[:SHOWN]) + (", …" if len(matches) > SHOWN else "")
        raise AmbiguousId(
            f"id prefix {id_or_prefix!r} matches more than one {what} ({shown}): "
            "give more characters",
            candidates=matches[:SHOWN],
        )
    return matches[0]


def unique_prefixes(conn: Connection, column: Column[Any], ids: Iterable[str]) -> dict[str, str]:
    """Each of `ids` mapped to its shortest prefix (MIN_PREFIX characters at least) that no
    other row of `column` begins with: what `resolve` takes back, whatever it is scoped to.

    Only an id's neighbours in sorted order can share its longest common prefix, so two
    index look-ups per id answer it, never a scan. Ids are UUIDs of one shape: any
    collation orders them as their bytes do.
    """
    wanted = sorted(set(ids))
    found: dict[str, str] = {}
    for start in range(0, len(wanted), PER_STATEMENT):
        rows = [_neighbours(column, one) for one in wanted[start : start + PER_STATEMENT]]
        query = rows[0] if len(rows) == 1 else union_all(*rows)
        for one, before, after in conn.execute(query).tuples():
            shared = max(_common(one, before), _common(one, after))
            found[one] = one[: max(MIN_PREFIX, shared + 1)]
    return found


def _neighbours(column: Column[Any], one: str) -> Any:
    before = select(column).where(column < one).order_by(column.desc()).limit(1)
    after = select(column).where(column > one).order_by(column).limit(1)
    return select(
        literal(one, String).label("id"),
        before.scalar_subquery().label("before"),
        after.scalar_subquery().label("after"),
    )


def _common(one: str, other: str | None) -> int:
    """How many leading characters `one` and `other` share."""
    if other is None:
        return 0
    n = 0
    for a, b in zip(one, other, strict=False):
        if a != b:
            break
        n += 1
    return n
