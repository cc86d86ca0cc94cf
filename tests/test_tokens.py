"""API tokens on SQLite and PostgreSQL: shown once, stored as a hash, scoped, expiring, revoked."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, inspect, text, update

from producer.errors import DuplicateName, NotFound, SpecError
from producer.store.db import make_engine
from producer.store.migrate import _config, upgrade
from producer.store.repository import Store
from producer.tokens import (
    ALPHABET,
    SCOPES,
    TokenInfo,
    Tokens,
    checksum,
    token_hash,
    tokens_t,
    well_formed,
)
from tests.conftest import Env, run_cli

# The pattern the module docstring and the README give secret scanners.
SCANNER = re.compile(r"\bexq_[0-9A-Za-z]{49}\b")


@pytest.fixture
def tokens(store: Store) -> Tokens:
    return Tokens(store)


@contextmanager
def statements(store: Store) -> Iterator[list[str]]:
    """Every SQL statement sent to the store while the block runs."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", record)


def set_column(store: Store, token_id: str, **values: Any) -> None:
    """What time passing (or someone with database rights) does to a token's row."""
    with store.engine.begin() as conn:
        conn.execute(update(tokens_t).where(tokens_t.c.id == token_id).values(**values))


def flip(raw: str, at: int) -> str:
    """`raw` with the character at `at` replaced by another of the alphabet."""
    other = ALPHABET[(ALPHABET.index(raw[at]) + 1) % len(ALPHABET)]
    return raw[:at] + other + raw[at + 1 :]


# --- format -------------------------------------------------------------------------------


def test_a_token_has_the_prefix_43_random_characters_and_a_crc32_checksum(
    tokens: Tokens,
) -> None:
    info, raw = tokens.create(tenant="alpha", scopes=["read"])
    assert SCANNER.fullmatch(raw) and SCANNER.findall(f"leaked: {raw}.") == [raw]
    body, check = raw[4:47], raw[47:]
    # What a scanner does without the database: CRC32 of the random part, in base62.
    value, digits = zlib.crc32(body.encode()), ""
    while value:
        value, rest = divmod(value, 62)
        digits = ALPHABET[rest] + digits
    assert check == digits.rjust(6, "0") == checksum(body)
    assert re.fullmatch(r"tok_[0-9a-f]{12}", info.id)
    assert info.name == f"token-{info.id}"


def test_tokens_are_different_every_time(tokens: Tokens) -> None:
    made = {tokens.create(tenant="alpha", scopes=["read"])[1] for _ in range(20)}
    assert len(made) == 20


def test_a_flipped_character_fails_verify_without_asking_the_store(tokens: Tokens) -> None:
    _, raw = tokens.create(tenant="alpha", scopes=["read"])
    with statements(tokens.store) as seen:
        for at in (4, 20, 46, 47, 52):
            assert not well_formed(flip(raw, at))
            assert tokens.verify(flip(raw, at)) is None
    assert seen == []
    assert tokens.verify(raw) is not None


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "exq_",
        "Bearer exq_",
        "exq_" + "0" * 49,
        "exq_" + "A" * 48 + "!",
        "exq_" + "é" * 49,
        "exq_" + "a" * 10_000,
        "\x00" * 53,
        "ghp_" + "A" * 49,
        None,
        b"exq_" + b"A" * 49,
        53,
    ],
)
def test_verify_turns_away_garbage_without_raising_or_a_query(tokens: Tokens, garbage: Any) -> None:
    with statements(tokens.store) as seen:
        assert tokens.verify(garbage) is None
    assert seen == []


def test_a_well_formed_token_nobody_made_is_unknown(tokens: Tokens) -> None:
    from producer.tokens import new_token

    assert tokens.verify(new_token()) is None


# --- storage ------------------------------------------------------------------------------


def _everything_in(store: Store) -> str:
    """Every row of every table, as text."""
    dumped = []
    with store.engine.connect() as conn:
        for table in inspect(store.engine).get_table_names():
            dumped += [repr(tuple(row)) for row in conn.execute(text(f'SELECT * FROM "{table}"'))]
    return "\n".join(dumped)


def test_only_the_sha256_of_a_token_is_stored(tokens: Tokens, database_url: str) -> None:
    info, raw = tokens.create(tenant="alpha", scopes=SCOPES, name="ci", operator="ops")
    assert tokens.verify(raw) is not None
    tokens.revoke(info.id, operator="ops")
    everything = _everything_in(tokens.store)
    assert raw not in everything and raw[4:47] not in everything
    with tokens.store.engine.connect() as conn:
        stored = conn.execute(text("SELECT token_hash FROM tokens")).scalar_one()
    assert stored == token_hash(raw)
    if database_url.startswith("sqlite"):
        path = Path(database_url.removeprefix("sqlite:///"))
        for file in path.parent.glob(path.name + "*"):  # the database, its -wal and -shm
            assert raw[4:47].encode() not in file.read_bytes(), file


def test_creating_and_revoking_are_audited_with_the_operator_and_the_token_id(
    tokens: Tokens,
) -> None:
    info, raw = tokens.create(
        tenant="alpha", scopes=["submit", "read"], name="deploy-bot", operator="alice"
    )
    tokens.revoke(info.id, operator="bob")
    tokens.revoke(info.id, operator="carol")  # already revoked: nothing more happens
    events = [e for e in tokens.store.audit.events(tenant="alpha")]
    assert [(e.phase, e.command_id, e.principal, e.operator) for e in events] == [
        ("token_create", info.id, "alice", "alice"),
        ("token_revoke", info.id, "bob", "bob"),
    ]
    assert events[0].detail == {
        "name": "deploy-bot",
        "scopes": ["submit", "read"],
        "expires_at": None,
    }
    written = json.dumps([e.to_json() for e in events])
    assert raw not in written and token_hash(raw) not in written
    assert tokens.store.audit.verify().ok


# --- scopes, tenants, names ---------------------------------------------------------------


def test_scopes_are_checked_and_kept(tokens: Tokens) -> None:
    with pytest.raises(SpecError, match=r"'admin'.*submit, read, operate"):
        tokens.create(tenant="alpha", scopes=["read", "admin"])
    with pytest.raises(SpecError, match="at least one scope"):
        tokens.create(tenant="alpha", scopes=[])
    info, raw = tokens.create(tenant="alpha", scopes=("operate", "read", "read"))
    verified = tokens.verify(raw)
    assert verified is not None and verified.scopes == frozenset({"read", "operate"})
    assert info.to_json()["scopes"] == ["read", "operate"]
    assert tokens.list("alpha") == [verified]


def test_a_token_needs_a_valid_tenant_and_name(tokens: Tokens) -> None:
    with pytest.raises(SpecError, match="needs a tenant"):
        tokens.create(tenant="", scopes=["read"])
    with pytest.raises(SpecError, match="tenant name"):
        tokens.create(tenant="Alpha Corp", scopes=["read"])
    with pytest.raises(SpecError, match="token name"):
        tokens.create(tenant="alpha", scopes=["read"], name="ci\nforged: yes")
    assert tokens.list() == []


def test_names_are_unique_per_tenant_even_after_a_revoke(tokens: Tokens) -> None:
    first, _ = tokens.create(tenant="alpha", scopes=["read"], name="ci")
    with pytest.raises(DuplicateName, match=rf"'alpha' already has a token named 'ci': {first.id}"):
        tokens.create(tenant="alpha", scopes=["submit"], name="ci")
    tokens.create(tenant="beta", scopes=["read"], name="ci")
    tokens.revoke(first.id)
    with pytest.raises(DuplicateName, match="revoked"):
        tokens.create(tenant="alpha", scopes=["read"], name="ci")
    assert sorted((t.tenant, t.name) for t in tokens.list()) == [("alpha", "ci"), ("beta", "ci")]
    # The refused creates wrote nothing to the trail.
    assert [e.phase for e in tokens.store.audit.events(tenant="alpha")] == [
        "token_create",
        "token_revoke",
    ]


# --- expiry and revocation ----------------------------------------------------------------


def test_an_expired_token_stops_working(tokens: Tokens) -> None:
    soon = datetime.now(UTC) + timedelta(hours=1)
    info, raw = tokens.create(tenant="alpha", scopes=["read"], expires_at=soon)
    verified = tokens.verify(raw)
    assert verified is not None and verified.expires_at is not None
    assert abs(verified.expires_at - soon) < timedelta(milliseconds=1)
    set_column(tokens.store, info.id, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert tokens.verify(raw) is None
    assert tokens.list()[0].status() == "expired"
    with pytest.raises(SpecError, match="in the past"):
        tokens.create(tenant="alpha", scopes=["read"], expires_at=datetime(2020, 1, 1, tzinfo=UTC))


def test_a_revoked_token_stops_working_and_unknown_ids_are_not_found(tokens: Tokens) -> None:
    info, raw = tokens.create(tenant="alpha", scopes=["read"])
    other, other_raw = tokens.create(tenant="alpha", scopes=["read"])
    revoked = tokens.revoke(info.id)
    assert revoked.revoked_at is not None and revoked.status() == "revoked"
    assert tokens.verify(raw) is None
    assert tokens.verify(other_raw) is not None
    assert tokens.revoke(info.id) == revoked
    with pytest.raises(NotFound, match="tok_000000000000"):
        tokens.revoke("tok_000000000000")
    assert {t.id: t.status() for t in tokens.list()} == {info.id: "revoked", other.id: "active"}


def test_last_used_is_written_at_most_once_a_minute(tokens: Tokens) -> None:
    info, raw = tokens.create(tenant="alpha", scopes=["read"])
    first = tokens.verify(raw)
    assert first is not None and first.last_used_at is not None
    with statements(tokens.store) as seen:
        for _ in range(5):
            again = tokens.verify(raw)
            assert again is not None and again.last_used_at == first.last_used_at
    assert len(seen) == 5 and not any("UPDATE" in s.upper() for s in seen)
    set_column(tokens.store, info.id, last_used_at=first.last_used_at - timedelta(seconds=61))
    later = tokens.verify(raw)
    assert later is not None and later.last_used_at is not None
    assert later.last_used_at > first.last_used_at
    assert tokens.list()[0].last_used_at == later.last_used_at


def test_to_json_holds_every_field_but_the_token() -> None:
    at = datetime(2026, 12, 1, tzinfo=UTC)
    info = TokenInfo("tok_0123456789ab", "alpha", "ci", frozenset(SCOPES), at, None, None, None)
    assert info.to_json() == {
        "id": "tok_0123456789ab",
        "tenant": "alpha",
        "name": "ci",
        "scopes": ["submit", "read", "operate"],
        "status": "active",
        "created_at": "2026-12-01T00:00:00+00:00",
        "expires_at": None,
        "revoked_at": None,
        "last_used_at": None,
    }


def test_migration_0007_goes_down_and_up(database_url: str) -> None:
    from alembic import command

    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            cfg = _config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0006")
        assert not inspect(engine).has_table("tokens")
        with pytest.raises(Exception, match="db upgrade"):
            Tokens(Store(engine))
        upgrade(engine)
        _, raw = Tokens(Store(engine)).create(tenant="alpha", scopes=["read"])
        assert Tokens(Store(engine)).verify(raw) is not None
    finally:
        engine.dispose()


# --- the CLI ------------------------------------------------------------------------------


@pytest.fixture
def cli_env(make_env: Callable[..., Env], database_url: str) -> Env:
    # Token commands never reach the broker.
    return make_env(database_url, "redis://127.0.0.1:1/0")


def test_the_cli_creates_lists_and_revokes_a_token(cli_env: Env, database_url: str) -> None:
    made = run_cli(
        cli_env,
        "token",
        "create",
        "--tenant",
        "alpha",
        "--scope",
        "submit,read",
        "--scope",
        "operate",
        "--name",
        "web",
        "--expires",
        "30d",
        "--operator",
        "alice",
        "--json",
    )
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    raw, token_id = created["token"], created["id"]
    assert SCANNER.fullmatch(raw)
    assert created["scopes"] == ["submit", "read", "operate"] and created["name"] == "web"
    expires = datetime.fromisoformat(created["expires_at"])
    assert timedelta(days=29, hours=23) < expires - datetime.now(UTC) <= timedelta(days=30)

    engine = make_engine(database_url)
    try:
        verified = Tokens(Store(engine)).verify(raw)
        assert verified is not None and verified.tenant == "alpha"
    finally:
        engine.dispose()

    listed = run_cli(cli_env, "token", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert raw not in listed.stdout and token_hash(raw) not in listed.stdout
    [row] = json.loads(listed.stdout)
    assert row["id"] == token_id and row["status"] == "active" and row["last_used_at"]
    table = run_cli(cli_env, "token", "list", "--tenant", "alpha")
    assert table.returncode == 0 and token_id in table.stdout and raw not in table.stdout

    gone = run_cli(cli_env, "token", "revoke", token_id, "--operator", "bob", "--json")
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["status"] == "revoked"
    assert json.loads(run_cli(cli_env, "token", "list", "--json").stdout)[0]["revoked_at"]

    # The audit file got the same events as the store, without the token.
    trail = (cli_env.root / "audit.jsonl").read_text()
    assert raw not in trail and token_hash(raw) not in trail
    phases = [json.loads(line).get("phase") for line in trail.splitlines()]
    assert [p for p in phases if p] == ["token_create", "token_revoke"]


def test_the_cli_prints_the_token_alone_on_stdout(cli_env: Env) -> None:
    made = run_cli(cli_env, "token", "create", "--tenant", "beta", "--scope", "read")
    assert made.returncode == 0, made.stderr
    assert SCANNER.fullmatch(made.stdout.strip())
    assert "only time" in made.stderr


def test_the_cli_refuses_bad_input_with_the_contract_exit_codes(cli_env: Env) -> None:
    def create(*args: str) -> Any:
        return run_cli(cli_env, "token", "create", "--json", *args)

    unknown_tenant = create("--tenant", "gamma", "--scope", "read")
    assert unknown_tenant.returncode == 2 and "alpha, beta" in unknown_tenant.stdout
    unknown_scope = create("--tenant", "alpha", "--scope", "read,admin")
    assert unknown_scope.returncode == 2 and "'admin'" in unknown_scope.stdout
    bad_expiry = run_cli(
        cli_env, "token", "create", "--tenant", "alpha", "--scope", "read", "--expires", "soon"
    )
    assert bad_expiry.returncode == 2 and "--expires" in bad_expiry.stderr
    assert create("--tenant", "alpha", "--scope", "read", "--name", "ci").returncode == 0
    duplicate = create("--tenant", "alpha", "--scope", "read", "--name", "ci")
    assert duplicate.returncode == 1 and "already has a token named 'ci'" in duplicate.stdout
    missing = run_cli(cli_env, "token", "revoke", "tok_000000000000", "--json")
    assert missing.returncode == 1 and json.loads(missing.stdout)["error"]
