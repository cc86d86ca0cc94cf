"""A worker whose tenant runs commands as other uids refuses a store they could read."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.settings import Settings
from producer.tenants import TenantsFile
from tests.conftest import Env, run_cli
from workers.boundary import exposed

TENANTS = TenantsFile.model_validate(
    {
        "tenants": {
            "jailed": {
                "executables": ["/bin/echo"],
                "run_as": {"uid_min": 20100, "uid_max": 20101, "gid": 20100},
            },
            "plain": {"executables": ["/bin/echo"]},
        }
    }
).for_env("dev")


@pytest.fixture
def shared_dir(searchable_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("EXECQ_SECRETS_KEY_FILE", "EXECQ_AUDIT_KEY_FILE", "EXECQ_SIGNING_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    return searchable_dir


def test_a_store_or_audit_log_a_run_as_uid_could_read_is_named(shared_dir: Path) -> None:
    db, audit = shared_dir / "execq.db", shared_dir / "audit.jsonl"
    db.write_text("")
    audit.write_text("")
    db.chmod(0o644)
    audit.chmod(0o640)
    settings = Settings(database_url=f"sqlite:///{db}", audit_log=audit)
    problems = exposed(settings, TENANTS.tenants["jailed"])
    assert len(problems) == 1 and str(db) in problems[0] and "uid 20100" in problems[0]
    # A tenant running commands as the worker's own user has nothing more to fear here.
    assert exposed(settings, TENANTS.tenants["plain"]) == []
    db.chmod(0o600)
    assert exposed(settings, TENANTS.tenants["jailed"]) == []
    # The audit key, beside the sealing key in the keys directory, counts as much.
    keys = shared_dir / "keys"
    keys.mkdir(mode=0o755)
    (keys / "audit.key").write_text("k" * 64)
    (keys / "audit.key").chmod(0o644)
    problems = exposed(settings, TENANTS.tenants["jailed"])
    assert len(problems) == 1 and "audit.key" in problems[0]


def test_the_store_execq_creates_itself_passes(shared_dir: Path) -> None:
    from producer.store.db import make_engine

    db = shared_dir / ".execq" / "execq.db"
    make_engine(f"sqlite:///{db}").dispose()
    settings = Settings(database_url=f"sqlite:///{db}", audit_log=shared_dir / ".execq" / "a.jsonl")
    assert exposed(settings, TENANTS.tenants["jailed"]) == []


def test_a_prod_worker_refuses_a_tenant_without_run_as(env: Env) -> None:
    done = run_cli(
        env,
        "worker",
        "--tenant",
        "alpha",
        extra={"EXECQ_ENV": "prod", "EXECQ_SIGNING_KEY": "k" * 32},
        timeout=60,
    )
    assert done.returncode == 2
    assert "EXECQ_ENV=prod needs run_as for tenant 'alpha'" in done.stderr + done.stdout


def test_a_worker_refuses_to_start_when_its_run_as_uids_could_read_the_store(
    env: Env, shared_dir: Path
) -> None:
    tenants = shared_dir / "tenants.yaml"
    tenants.write_text(
        "tenants:\n  jailed:\n    executables: [/bin/echo]\n"
        "    run_as: {uid_min: 20100, uid_max: 20101, gid: 20100}\n"
    )
    db = shared_dir / "execq.db"
    db.write_text("")
    db.chmod(0o644)  # what a hand-made store often is
    extra = {"EXECQ_TENANTS_FILE": str(tenants), "EXECQ_DATABASE_URL": f"sqlite:///{db}"}
    done = run_cli(env, "worker", "--tenant", "jailed", extra=extra, timeout=60)
    assert done.returncode == 2
    assert f"{db} is readable by uid 20100" in done.stderr + done.stdout
