"""Settings and the tenants file are validated once; errors name what to fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from producer.client import Producer
from producer.errors import ConfigError, ExecqError
from producer.redaction import MaskLevel
from producer.settings import ConfigInvalid, Settings, load_settings
from producer.tenants import load_tenants

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_tenants_file_is_valid_and_has_a_prod_tenant_with_deny_args() -> None:
    tenants = load_tenants(ROOT / "config" / "tenants.yaml", env="dev")
    assert len(tenants.tenants) >= 2
    assert tenants.tenants["prod"].deny_args and tenants.tenants["prod"].deny_options
    assert tenants.tenants["acme"].queue == "acme"
    assert tenants.tenants["acme"].actions and tenants.tenants["prod"].actions
    # Every environment resolves, and the prod tenant is stricter outside dev.
    for env in ("staging", "prod"):
        stricter = load_tenants(ROOT / "config" / "tenants.yaml", env=env).tenants["prod"]
        assert len(stricter.deny_args) > len(tenants.tenants["prod"].deny_args)
    # In production, the prod tenant runs its actions only.
    assert tenants.tenants["prod"].raw_argv
    assert not load_tenants(ROOT / "config" / "tenants.yaml", env="prod").tenants["prod"].raw_argv


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EXECQ_"):
            monkeypatch.delenv(name)
    s = load_settings()
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.database_url == "sqlite:///.execq/execq.db"
    assert str(s.tenants_file) == "config/tenants.yaml"
    assert str(s.audit_log) == ".execq/audit.jsonl"
    assert s.env == "dev" and s.lease_s == 30


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EXECQ_LEASE_S", "soon"),
        ("EXECQ_LEASE_S", "0"),
        ("EXECQ_ENV", "production"),
        ("EXECQ_BROKER_URL", "amqp://guest@localhost//"),
        ("EXECQ_DATABASE_URL", "mysql://x"),
    ],
)
def test_an_invalid_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigInvalid, match=name):
        load_settings()
    with pytest.raises(ConfigError, match=name):
        Producer.from_env()


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("tenants: {}", "at least one tenant"),
        ("tenants: {acme: {executables: [echo]}}", "not an absolute path"),
        ("tenants: {acme: {executables: []}}", "at least one executable"),
        ("tenants: {Bad_Name: {executables: [/bin/echo]}}", "tenant name"),
        ("tenants: {acme: {executables: [/bin/echo], limits: {timeout_s: -1}}}", "timeout_s"),
        ("tenants: {acme: {executables: [/bin/echo], deny_args: ['(']}}", "not a valid regex"),
        ("tenants: {acme: {executables: [/bin/echo], surprise: 1}}", "surprise"),
        (
            "tenants: {acme: {executables: [/bin/echo], environments: {production: {}}}}",
            "unknown environment 'production'",
        ),
        (
            "tenants: {acme: {executables: [/bin/echo], deny_args: [{executable: /bin/rm, x: 1}]}}",
            "deny_args.0.scoped.x",
        ),
        ("tenants: [1, 2]", "tenants"),
        # The file and the line, on one line: an editor or a log search finds it.
        ("tenants: [unclosed", "tenants.yaml:1:19: while parsing a flow sequence: expected"),
    ],
)
def test_a_bad_tenants_file_is_refused_naming_the_field(
    tmp_path: Path, yaml_text: str, needle: str
) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigInvalid, match=needle.replace("(", r"\(")):
        load_tenants(path)


@pytest.mark.parametrize(
    ("yaml_value", "level"),
    [(None, MaskLevel.L1), ("L3", MaskLevel.L3), ("'off'", MaskLevel.OFF), ("off", MaskLevel.OFF)],
)
def test_a_tenant_chooses_its_masking_level(
    tmp_path: Path, yaml_value: str | None, level: MaskLevel
) -> None:
    masking = f", masking: {yaml_value}" if yaml_value else ""
    path = tmp_path / "tenants.yaml"
    path.write_text(f"tenants: {{acme: {{executables: [/bin/echo]{masking}}}}}")
    tenant = load_tenants(path).tenants["acme"]
    assert MaskLevel(tenant.masking) is level


@pytest.mark.parametrize("value", ["L4", "l1", "none", "true", "1"])
def test_an_unknown_masking_level_is_refused_naming_the_field(tmp_path: Path, value: str) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(f"tenants: {{acme: {{executables: [/bin/echo], masking: {value}}}}}")
    with pytest.raises(ConfigInvalid, match=r"tenants\.acme\.masking"):
        load_tenants(path)


def test_a_missing_tenants_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid, match="EXECQ_TENANTS_FILE"):
        load_tenants(tmp_path / "nope.yaml")


def test_config_errors_are_execq_errors() -> None:
    assert issubclass(ConfigError, ExecqError) and issubclass(ConfigError, ConfigInvalid)


def test_every_execq_process_exits_2_naming_a_bad_setting(tmp_path: Path) -> None:
    env = {**os.environ, "EXECQ_TENANTS_FILE": str(tmp_path / "missing.yaml")}
    for args in (["worker", "--tenant", "acme"], ["list"], ["demo"]):
        done = subprocess.run(
            [sys.executable, "-m", "workers.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "EXECQ_TENANTS_FILE" in done.stderr


def test_settings_are_frozen() -> None:
    with pytest.raises(ValueError):
        Settings().lease_s = 5  # type: ignore[misc]
