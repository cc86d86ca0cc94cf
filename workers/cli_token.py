"""`execq token …`: create, list and revoke the HTTP gateway's API tokens."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from producer.errors import SpecError
from producer.settings import load_settings
from producer.tenants import load_tenants
from workers.clikit import JsonOpt, OperatorOpt, err, fail, handled, out

if TYPE_CHECKING:
    from producer.tokens import Tokens

token_app = typer.Typer(
    help=(
        "API tokens for the HTTP gateway (`Authorization: Bearer exq_…`).\n\n"
        "A token belongs to one tenant and carries scopes: submit, read, operate. It is shown "
        "once, when it is created; the store keeps only its SHA-256. Its name is the "
        "principal of what it does in the audit trail."
    ),
    no_args_is_help=True,
)

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(value: str, now: datetime | None = None) -> datetime:
    """`30d`, `12h`, `90m`, `45s`, `2w` from now, or an ISO 8601 time (UTC when it has no zone)."""
    text = value.strip()
    match = _DURATION.fullmatch(text)
    if match:
        seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
        return (now or datetime.now(UTC)) + timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither a duration (30d, 12h, 90m, 2w) nor an ISO 8601 time "
            "(2027-01-31 or 2027-01-31T12:00:00Z)",
            param_hint="--expires",
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@contextmanager
def _tokens() -> Iterator[Tokens]:
    from producer.audit.trail import Trail  # noqa: PLC0415  (keeps `--help` fast)
    from producer.store.db import make_engine, require_schema  # noqa: PLC0415
    from producer.store.repository import Store  # noqa: PLC0415
    from producer.tokens import Tokens  # noqa: PLC0415

    settings = load_settings()
    engine = make_engine(settings.database_url)
    try:
        require_schema(engine)
        yield Tokens(Store(engine), trail=Trail.from_settings(settings))
    finally:
        engine.dispose()


def _when(value: datetime | None, never: str = "-") -> str:
    return never if value is None else f"{value:%Y-%m-%d %H:%M}"


@token_app.command("create")
@handled
def create_cmd(
    tenant: Annotated[
        str, typer.Option("--tenant", "-t", help="The tenant the token acts for (tenants file).")
    ],
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope",
            help="Scopes, comma-separated or repeated: submit, read, operate.",
            show_default=False,
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option(help="Unique within the tenant; the principal in audit events."),
    ] = None,
    expires: Annotated[
        str | None,
        typer.Option(help="When it stops working: 30d, 12h, 2w, or an ISO 8601 time."),
    ] = None,
    operator: OperatorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a token and print it, once: store it now, nothing shows it again.

    Exit 2 for an unknown tenant or scope, or a malformed name or expiry; 1 when the tenant
    already has a token of that name.
    """
    scopes = [s.strip() for one in scope for s in one.split(",") if s.strip()]
    expires_at = parse_expiry(expires) if expires is not None else None
    settings = load_settings()
    known = load_tenants(settings.tenants_file).tenants
    if tenant not in known:
        fail(
            f"unknown tenant {tenant!r}: {settings.tenants_file} defines "
            f"{', '.join(sorted(known)) or 'none'}",
            2,
            as_json=as_json,
        )
    with _tokens() as tokens:
        try:
            info, raw = tokens.create(
                tenant=tenant, scopes=scopes, name=name, expires_at=expires_at, operator=operator
            )
        except SpecError as exc:
            fail(str(exc), 2, as_json=as_json)
    if as_json:
        print(json.dumps({**info.to_json(), "token": raw}))
        return
    until = "never" if info.expires_at is None else f"{_when(info.expires_at)} UTC"
    err.print(
        f"created {info.id} for tenant {info.tenant}: name {escape(info.name)}, scopes "
        f"{','.join(info.to_json()['scopes'])}, expires {until}",
        highlight=False,
    )
    print(raw)
    err.print("This is the only time the token is shown: store it now.", highlight=False)


@token_app.command("list")
@handled
def list_cmd(
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="Only this tenant's tokens.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every token (revoked and expired ones too): never the token nor its hash."""
    with _tokens() as tokens:
        found = tokens.list(tenant)
    if as_json:
        print(json.dumps([one.to_json() for one in found]))
        return
    if not found:
        out.print("no tokens" + (f" for tenant {tenant}" if tenant else ""), highlight=False)
        return
    table = Table(title="tokens (times in UTC)", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("id", "tenant", "name", "scopes", "status"):
        table.add_column(column, no_wrap=column in ("id", "status"))
    for column in ("created", "expires", "last used"):
        table.add_column(column)
    for one in found:
        status = one.status()
        style = {"active": "green", "expired": "yellow", "revoked": "red"}[status]
        table.add_row(
            one.id,
            one.tenant,
            escape(one.name),
            ",".join(one.to_json()["scopes"]),
            f"[{style}]{status}[/]",
            _when(one.created_at),
            _when(one.expires_at, "never"),
            _when(one.last_used_at, "never"),
        )
    out.print(table)


@token_app.command("revoke")
@handled
def revoke_cmd(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token's id (tok_…).")],
    operator: OperatorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop a token from working, from the next request on (exit 1 when there is no such id)."""
    with _tokens() as tokens:
        before = tokens.get(token_id)
        info = tokens.revoke(token_id, operator=operator)
    if as_json:
        print(json.dumps(info.to_json()))
    elif before.revoked_at is not None:
        out.print(f"{info.id} was already revoked ({_when(info.revoked_at)} UTC)", highlight=False)
    else:
        out.print(f"revoked {info.id} ({escape(info.name)}, tenant {info.tenant})", highlight=False)
