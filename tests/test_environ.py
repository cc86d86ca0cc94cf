"""An unknown EXECQ_* variable stops every execq process at start, naming the likely intent."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from producer import environ
from producer.settings import ConfigInvalid

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"\bEXECQ_[A-Z][A-Z0-9_]*[A-Z0-9]")


def execq(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **extra},
        timeout=60,
        check=False,
    )


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_a_misspelt_variable_stops_the_command_with_exit_2_naming_the_known_one() -> None:
    result = execq("status", "x", EXECQ_BROKR_URL="redis://127.0.0.1:6379/0")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "EXECQ_BROKR_URL" in lines[0] and "did you mean EXECQ_BROKER_URL?" in lines[0]
    assert result.stdout == ""


def test_no_command_escapes_the_check_not_even_help() -> None:
    result = execq("worker", "--help", EXECQ_TENANT_FILE="config/tenants.yaml")
    assert result.returncode == 2
    assert "did you mean EXECQ_TENANTS_FILE?" in result.stderr


def test_names_are_compared_as_the_settings_read_them_regardless_of_case() -> None:
    environ.check({"execq_broker_url": "redis://x", "EXECQ_NAMESPACE": "a", "PATH": "/bin"})
    with pytest.raises(ConfigInvalid, match=r"execq_namspace \(did you mean EXECQ_NAMESPACE\?\)"):
        environ.check({"execq_namspace": "a"})


def test_every_unknown_name_is_listed_and_a_far_one_still_gets_the_nearest() -> None:
    with pytest.raises(ConfigInvalid) as caught:
        environ.check({"EXECQ_ZZZZ": "1", "EXECQ_LEASE": "3"})
    message = str(caught.value)
    assert "\n" not in message
    assert "EXECQ_LEASE (did you mean EXECQ_LEASE_S?)" in message
    assert "EXECQ_ZZZZ (nothing close; the nearest is EXECQ_" in message


def test_every_settings_field_and_its_file_variant_is_known() -> None:
    known = environ.known_names()
    for name in ("EXECQ_BROKER_URL", "EXECQ_NAMESPACE", "EXECQ_ENV", "EXECQ_TENANTS_FILE"):
        assert name in known
    for key in ("EXECQ_SIGNING_KEY", "EXECQ_SECRETS_KEY", "EXECQ_AUDIT_KEY"):
        assert {key, f"{key}_FILE"} <= known


def test_every_module_with_an_execq_settings_class_is_read_for_names() -> None:
    found = set()
    for path in _sources("producer", "workers"):
        if re.search(r"env_prefix\s*=\s*[\"']EXECQ_", path.read_text(encoding="utf-8")):
            found.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    assert found, "no settings class found: has the pattern gone stale?"
    assert found <= set(environ.SETTINGS_MODULES)


def test_every_execq_name_in_the_code_is_known() -> None:
    # A settings class's env_prefix (EXECQ_GATEWAY_) is spelt in the code too.
    prefixes = {
        str(cls.model_config.get("env_prefix", "")).upper().rstrip("_")
        for cls in environ._settings_classes()
    }
    known = environ.known_names() | prefixes
    missing = {
        f"{name} ({path.relative_to(ROOT)})"
        for path in _sources("producer", "workers")
        for name in NAME.findall(path.read_text(encoding="utf-8"))
        if name not in known
    }
    assert missing == set()


def test_the_variables_tests_and_benchmarks_read_are_known() -> None:
    # What they read from the environment is inherited by the execq processes they start.
    read = re.compile(
        r"(?:environ\.get\(|getenv\(|environ\[|_ENV\s*=\s*)\s*[\"'](EXECQ_[A-Z0-9_]+)[\"']"
    )
    names = {n for p in _sources("tests", "bench") for n in read.findall(p.read_text("utf-8"))}
    assert {"EXECQ_TEST_REDIS_URL", "EXECQ_TEST_PG_URL"} <= names
    assert names - environ.known_names() == set()
