"""execq finds its project from any directory below it, and says where it looked when not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from producer.keys import AuditKeySettings
from producer.settings import ConfigInvalid, load_settings
from producer.tenants import load_tenants

ROOT = Path(__file__).resolve().parent.parent
TENANTS = ROOT / "config" / "tenants.yaml"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory: the shipped tenants file in `config/`, nothing else yet."""
    (tmp_path / "project" / "config").mkdir(parents=True)
    shutil.copy(TENANTS, tmp_path / "project" / "config" / "tenants.yaml")
    return tmp_path / "project"


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("EXECQ_"):
            monkeypatch.delenv(name)


def execq(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`execq ARGS` run in `cwd` with no EXECQ_* setting but `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("EXECQ_")}
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.usefixtures("no_settings")
def test_from_a_subdirectory_every_default_points_into_the_project(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    below = project / "src" / "app"
    below.mkdir(parents=True)
    monkeypatch.chdir(below)
    settings = load_settings()
    assert settings.tenants_file == project / "config" / "tenants.yaml"
    assert settings.database_url == f"sqlite:///{project}/.execq/execq.db"
    assert settings.audit_log == project / ".execq" / "audit.jsonl"
    assert settings.workdir_root == project / ".execq" / "work"
    assert AuditKeySettings().audit_witness == project / ".execq" / "audit-witness.jsonl"


@pytest.mark.usefixtures("no_settings")
def test_in_the_project_directory_the_defaults_are_as_documented(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    settings = load_settings()
    assert str(settings.tenants_file) == "config/tenants.yaml"
    assert settings.database_url == "sqlite:///.execq/execq.db"


@pytest.mark.usefixtures("no_settings")
def test_outside_any_project_the_error_names_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigInvalid) as raised:
        load_settings()
    assert str(raised.value) == (
        f"no config/tenants.yaml in {tmp_path} or any parent; "
        "set EXECQ_TENANTS_FILE or run from the project directory"
    )
    # A tenants file named explicitly is still read from anywhere.
    assert load_tenants(TENANTS).tenants


def test_the_cli_finds_the_project_from_a_subdirectory(project: Path) -> None:
    below = project / "deploy" / "scripts"
    below.mkdir(parents=True)
    checked = execq(below, "config", "check")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"{project}/config/tenants.yaml: valid")
    upgraded = execq(below, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    # The project's store, not a new one where the command ran.
    assert (project / ".execq" / "execq.db").is_file()
    assert not (below / ".execq").exists()


@pytest.mark.parametrize("command", [("status", "abc"), ("config", "check"), ("db", "upgrade")])
def test_the_cli_outside_any_project_exits_2_and_makes_no_store(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    done = execq(tmp_path, *command)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"no config/tenants.yaml in {tmp_path} or any parent" in done.stderr
    assert "set EXECQ_TENANTS_FILE or run from the project directory" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_explicit_tenants_file_wins_over_the_project(project: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    shutil.copy(TENANTS, other)
    below = project / "sub"
    below.mkdir()
    checked = execq(below, "config", "check", EXECQ_TENANTS_FILE=str(other))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"{other}: valid")
    # Set explicitly, a file is taken as given, relative to where execq runs.
    (below / "config").mkdir()
    shutil.copy(TENANTS, below / "config" / "local.yaml")
    relative = execq(below, "config", "check", EXECQ_TENANTS_FILE="config/local.yaml")
    assert relative.returncode == 0, relative.stderr
    assert relative.stdout.startswith("config/local.yaml: valid")
