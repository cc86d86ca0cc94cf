"""run_as ranges: one uid per pool process, never shared by two tenants or with an account.

Fast and worker-free: the file is loaded directly and the CLI runs as a subprocess.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from producer.settings import ConfigInvalid
from producer.tenants import host_conflicts, load_tenants

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    return path


def refusal(path: Path, env: str = "dev") -> str:
    with pytest.raises(ConfigInvalid) as caught:
        load_tenants(path, env=env)
    return " ".join(str(caught.value).split())


def run_cli(*args: str, tenants_file: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EXECQ_", "OTEL_"))}
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env={
            **base,
            "COLUMNS": "200",
            "EXECQ_TENANTS_FILE": str(tenants_file),
            "EXECQ_DATABASE_URL": f"sqlite:///{tenants_file.parent / 'execq.db'}",
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def existing_account() -> pwd.struct_passwd | None:
    """An account of this host with a uid a run_as range may name, if there is one."""
    usable = [e for e in pwd.getpwall() if 1000 <= e.pw_uid < 65534]
    return min(usable, key=lambda e: e.pw_uid) if usable else None


def test_two_tenants_whose_uid_ranges_overlap_are_refused_naming_both_and_the_uids(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        "tenants:\n"
        "  web: {executables: [/bin/echo], run_as: {uid_min: 20000, uid_max: 20009, gid: 20000}}\n"
        "  etl: {executables: [/bin/echo], run_as: {uid_min: 20005, uid_max: 20019, gid: 20001}}\n",
    )
    text = refusal(path)
    assert str(path) in text
    assert "'web' (20000-20009) and 'etl' (20005-20019) overlap" in text
    assert "uids 20005-20009" in text


def test_ranges_that_only_touch_are_not_an_overlap(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "tenants:\n"
        "  web: {executables: [/bin/echo], run_as: {uid_min: 20000, uid_max: 20009, gid: 20000}}\n"
        "  etl: {executables: [/bin/echo], run_as: {uid_min: 20010, uid_max: 20019, gid: 20000}}\n"
        "  plain: {executables: [/bin/echo]}\n",
    )
    assert set(load_tenants(path, env="dev").tenants) == {"web", "etl", "plain"}


def test_an_overlap_made_by_one_environments_override_is_refused_in_that_environment_only(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        "tenants:\n"
        "  web: {executables: [/bin/echo], run_as: {uid_min: 20000, uid_max: 20009, gid: 20000}}\n"
        "  etl:\n"
        "    executables: [/bin/echo]\n"
        "    run_as: {uid_min: 30000, uid_max: 30009, gid: 30000}\n"
        "    environments:\n"
        "      prod: {run_as: {uid_min: 20009, uid_max: 20015, gid: 30000}}\n",
    )
    assert load_tenants(path, env="dev").tenants["etl"].run_as is not None
    assert load_tenants(path, env="staging").tenants["etl"].run_as is not None
    text = refusal(path, env="prod")
    assert "EXECQ_ENV=prod" in text and "'web' (20000-20009) and 'etl' (20009-20015)" in text
    assert "uid 20009" in text


def test_a_base_overlap_that_every_environment_overrides_away_is_not_refused(
    tmp_path: Path,
) -> None:
    # Only the policy in force counts: the base ranges never apply here.
    override = "{run_as: {uid_min: 30000, uid_max: 30000, gid: 30000}}"
    path = write(
        tmp_path,
        "tenants:\n"
        "  web: {executables: [/bin/echo], run_as: {uid_min: 20000, uid_max: 20009, gid: 20000}}\n"
        "  etl:\n"
        "    executables: [/bin/echo]\n"
        "    run_as: {uid_min: 20000, uid_max: 20000, gid: 20000}\n"
        f"    environments: {{dev: {override}, staging: {override}, prod: {override}}}\n",
    )
    for env in ("dev", "staging", "prod"):
        assert load_tenants(path, env=env).tenants["etl"].run_as is not None


def test_a_tenant_with_more_pool_processes_than_uids_is_refused(tmp_path: Path) -> None:
    web = "executables: [/bin/echo], run_as: {uid_min: 20000, uid_max: 20001, gid: 20000}"
    ok = write(tmp_path, f"tenants: {{web: {{concurrency: 2, {web}}}}}")
    assert load_tenants(ok, env="dev").tenants["web"].concurrency == 2
    path = write(tmp_path, f"tenants: {{web: {{concurrency: 3, {web}}}}}")
    text = refusal(path)
    assert "'web' has concurrency 3 but its uid range 20000-20001 holds 2" in text


def test_a_narrower_range_in_one_environment_is_checked_against_the_concurrency(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        "tenants:\n"
        "  web:\n"
        "    concurrency: 4\n"
        "    executables: [/bin/echo]\n"
        "    environments:\n"
        "      prod: {run_as: {uid_min: 20000, uid_max: 20000, gid: 20000}}\n",
    )
    assert load_tenants(path, env="dev").tenants["web"].run_as is None
    assert "'web' has concurrency 4 but its uid range 20000-20000 holds 1" in refusal(path, "prod")


def test_host_conflicts_names_the_tenant_and_the_account_in_its_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def account(name: str, uid: int) -> pwd.struct_passwd:
        return pwd.struct_passwd((name, "x", uid, uid, "", f"/home/{name}", "/bin/sh"))

    accounts = [account("root", 0), account("alice", 20003), account("bob", 30000)]
    monkeypatch.setattr(pwd, "getpwall", lambda: accounts)
    path = write(
        tmp_path,
        "tenants:\n"
        "  web: {executables: [/bin/echo], run_as: {uid_min: 20000, uid_max: 20009, gid: 20000}}\n"
        "  etl: {executables: [/bin/echo], run_as: {uid_min: 30001, uid_max: 30009, gid: 30000}}\n"
        "  plain: {executables: [/bin/echo]}\n",
    )
    tenants = load_tenants(path, env="dev")
    assert host_conflicts(tenants) == [
        "tenant 'web': run_as uid range 20000-20009 includes the existing account "
        "'alice' (uid 20003) of this host"
    ]
    assert host_conflicts([tenants.tenants["etl"], tenants.tenants["plain"]]) == []


def _range_around(tmp_path: Path, uid: int) -> Path:
    return write(
        tmp_path,
        "tenants:\n"
        "  plain: {executables: [/bin/echo]}\n"
        "  web:\n"
        "    executables: [/bin/echo]\n"
        f"    run_as: {{uid_min: {uid}, uid_max: {uid}, gid: 20000}}\n",
    )


def test_config_check_exits_2_when_a_range_includes_an_account_of_this_host(
    tmp_path: Path,
) -> None:
    found = existing_account()
    if found is None:
        pytest.skip("this host has no account with a uid between 1000 and 65533")
    path = _range_around(tmp_path, found.pw_uid)
    done = run_cli("config", "check", str(path), tenants_file=path)
    text = " ".join(done.stderr.split())
    assert done.returncode == 2, done.stdout
    assert str(path) in text and "tenant 'web'" in text
    assert f"'{found.pw_name}' (uid {found.pw_uid})" in text


def test_a_worker_refuses_to_start_when_its_range_includes_an_account_of_this_host(
    tmp_path: Path,
) -> None:
    found = existing_account()
    if found is None:
        pytest.skip("this host has no account with a uid between 1000 and 65533")
    path = _range_around(tmp_path, found.pw_uid)
    done = run_cli("worker", "--tenant", "web", tenants_file=path)
    text = " ".join(done.stderr.split())
    assert done.returncode == 2, done.stderr
    assert "EXECQ_TENANTS_FILE" in text and f"'{found.pw_name}' (uid {found.pw_uid})" in text


def test_a_worker_refuses_more_pool_processes_than_its_tenant_has_uids(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "tenants:\n"
        "  web:\n"
        "    executables: [/bin/echo]\n"
        "    run_as: {uid_min: 60000, uid_max: 60001, gid: 60000}\n",
    )
    if host_conflicts(load_tenants(path, env="dev")):
        pytest.skip("this host has an account with uid 60000 or 60001")
    done = run_cli("worker", "--tenant", "web", "--concurrency", "3", tenants_file=path)
    text = " ".join(done.stderr.split())
    assert done.returncode == 2, done.stderr
    assert "--concurrency 3" in text and "60000-60001" in text
