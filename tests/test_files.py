"""Files execq creates for itself are private: directories 0700, files 0600 (WAL included)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from producer.audit.events import Outcome, Phase, Subject, make_event
from producer.audit.sinks import JsonlSink
from producer.store.db import make_engine
from producer.store.migrate import upgrade


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    # The common default: without execq's care, files would come out world-readable.
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_new_sqlite_store_and_its_wal_and_shm_files_are_private(tmp_path: Path) -> None:
    db = tmp_path / "state" / ".execq" / "execq.db"
    engine = make_engine(f"sqlite:///{db}")
    upgrade(engine)
    with engine.connect() as conn:  # keeps the WAL and SHM files while we look
        conn.execute(sa.text("SELECT count(*) FROM commands"))
        made = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
        assert all(p.exists() for p in made)
        assert {str(p.name): oct(mode(p)) for p in made} == {p.name: oct(0o600) for p in made}
    engine.dispose()
    assert mode(db.parent) == 0o700 and mode(db.parent.parent) == 0o700


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    make_engine(f"sqlite:///{shared}/execq.db").dispose()
    assert mode(shared) == 0o755 and mode(shared / "execq.db") == 0o600


def test_the_audit_log_and_its_directory_are_private(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    subject = Subject("c1", "acme", "alice", "0" * 64, None)
    JsonlSink(path).append([make_event(subject, Phase.PARSE, Outcome.OK, actor="t")])
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert mode(Path(f"{path}.lock")) == 0o600


def test_readable_by_follows_owner_group_and_other_bits_and_every_directory(
    searchable_dir: Path,
) -> None:
    from producer.files import readable_by

    base = searchable_dir
    shared = base / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    secret = shared / "key"
    secret.write_text("k")
    secret.chmod(0o644)
    assert readable_by(secret, 20001, 20001)  # world-readable, every directory searchable
    secret.chmod(0o640)
    assert not readable_by(secret, 20001, 20001)
    os.chown(secret, 0, 20001)
    assert readable_by(secret, 20001, 20001)  # through its group
    secret.chmod(0o600)
    assert not readable_by(secret, 20001, 20001)
    os.chown(secret, 20001, 0)
    assert readable_by(secret, 20001, 20001)  # its owner
    secret.chmod(0o644)
    os.chown(secret, 0, 0)
    shared.chmod(0o700)
    assert not readable_by(secret, 20001, 20001)  # a directory on the way shuts it out
    assert not readable_by(base / "missing", 20001, 20001)
