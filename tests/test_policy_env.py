"""Tenant policy per environment, per-executable deny rules, the schema and `execq config`.

Fast and worker-free: the policy is checked directly and the CLI runs as a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer import policy
from producer.errors import ConfigError, PolicyDenied
from producer.settings import ConfigInvalid, Environment
from producer.spec import CommandSpec
from producer.tenants import DEFAULT_ENV_ALLOW, TenantsFile, load_tenants, tenants_json_schema

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "tenants.yaml"

BASE = """
tenants:
  ops:
    executables: [/bin/echo, /bin/rm, /bin/ls]
    limits: {timeout_s: 60, cpu_s: 20, memory_mb: 128}
    deny_args: ['^--no-preserve-root$']
    max_retries: 5
    environments:
      staging:
        deny_args: ['^-rf$']
        limits: {timeout_s: 30}
      prod:
        executables: [/bin/echo, /bin/rm]
        deny_args: [{executable: /bin/rm}]
        allowed_env: [LANG]
        max_retries: 1
        snapshot_roots: [/srv/ops]
        network: false
        run_as: {uid_min: 20000, uid_max: 20999, gid: 20000}
        max_concurrent: 4
        submit_rate: {per_s: 2.5, burst: 10}
  plain:
    executables: [/bin/echo]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    return path


def refusal(tenants: TenantsFile, *argv: str, **fields: Any) -> str | None:
    """The rule that refuses the command, or None when it may run."""
    try:
        policy.check(CommandSpec(tenant="ops", argv=list(argv), **fields), tenants)
    except PolicyDenied as exc:
        return exc.rule
    return None


# --- per-environment overrides ------------------------------------------------------------


def test_each_environment_gets_its_own_deny_rules(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    dev, staging, prod = (load_tenants(path, env=e) for e in ("dev", "staging", "prod"))
    assert refusal(dev, "/bin/rm", "-rf", "/srv/x") is None
    assert refusal(dev, "/bin/rm", "--no-preserve-root", "/") == "deny_args:^--no-preserve-root$"
    assert refusal(staging, "/bin/rm", "-rf", "/srv/x") == "deny_args:^-rf$"
    # Lists replace the tenant's list: staging wrote its own deny_args.
    assert refusal(staging, "/bin/rm", "--no-preserve-root", "/") is None
    assert refusal(prod, "/bin/rm", "/srv/x/file") == "deny_executable:/bin/rm"
    assert refusal(prod, "/bin/echo", "-rf") is None


def test_limits_merge_field_by_field_and_the_rest_is_replaced(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    staging = load_tenants(path, env="staging").tenants["ops"]
    assert staging.limits.timeout_s == 30
    assert (staging.limits.cpu_s, staging.limits.memory_mb) == (20, 128)
    prod = load_tenants(path, env=Environment.PROD).tenants["ops"]
    assert prod.limits.timeout_s == 60
    assert prod.executables == ("/bin/echo", "/bin/rm")
    assert prod.env_allow == ("LANG",) and prod.max_retries == 1
    assert prod.snapshot_roots == ("/srv/ops",)
    assert prod.network is False and prod.max_concurrent == 4
    assert prod.run_as is not None and prod.run_as.uid_min == 20000
    assert prod.submit_rate is not None and prod.submit_rate.burst == 10
    assert prod.name == "ops" and prod.queue == "ops" and prod.resolved


def test_prod_overrides_are_enforced_by_the_policy(tmp_path: Path) -> None:
    prod = load_tenants(write(tmp_path, BASE), env="prod")
    assert refusal(prod, "/bin/ls") == "executables"
    assert refusal(prod, "/bin/echo", env={"COLOR": "1"}) == "env_allow"
    assert refusal(prod, "/bin/echo", retry_safe=True, max_retries=2) == "max_retries"
    assert refusal(prod, "/bin/echo", snapshot_paths=["/srv/ops/a"]) is None
    assert refusal(prod, "/bin/echo", snapshot_paths=["/srv/other"]) == "snapshot_roots"


def test_defaults_keep_todays_behaviour(tmp_path: Path) -> None:
    plain = load_tenants(write(tmp_path, BASE), env="prod").tenants["plain"]
    assert plain.network is True
    assert plain.run_as is None and plain.max_concurrent is None and plain.submit_rate is None
    assert plain.deny_args == ()


def test_the_environment_defaults_to_execq_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, BASE)
    monkeypatch.delenv("EXECQ_ENV", raising=False)
    assert load_tenants(path).environment is Environment.DEV
    monkeypatch.setenv("EXECQ_ENV", "prod")
    tenants = load_tenants(path)
    assert tenants.environment is Environment.PROD
    assert refusal(tenants, "/bin/rm", "x") == "deny_executable:/bin/rm"
    monkeypatch.setenv("EXECQ_ENV", "production")
    with pytest.raises(ConfigInvalid, match="EXECQ_ENV"):
        load_tenants(path)
    with pytest.raises(ConfigInvalid, match="EXECQ_ENV"):
        load_tenants(path, env="qa")


def test_a_resolved_file_can_be_resolved_again_for_another_environment(tmp_path: Path) -> None:
    dev = load_tenants(write(tmp_path, BASE), env="dev")
    prod = dev.for_env("prod")
    assert prod.environment is Environment.PROD
    assert refusal(prod, "/bin/rm", "x") == "deny_executable:/bin/rm"
    assert refusal(prod.for_env("dev"), "/bin/rm", "x") is None


def test_an_unresolved_tenant_is_never_judged(tmp_path: Path) -> None:
    # Judging by the base policy would quietly drop prod's restrictions: fail closed.
    raw = TenantsFile.model_validate(yaml.safe_load(BASE))
    with pytest.raises(ConfigError, match="environments"):
        refusal(raw, "/bin/echo", "hi")
    assert refusal(raw.for_env("dev"), "/bin/echo", "hi") is None


# --- deny rules scoped to an executable ---------------------------------------------------


def test_a_scoped_pattern_applies_to_its_executable_only(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "tenants: {ops: {executables: [/bin/echo, /bin/rm],"
        " deny_args: [{executable: /bin/rm, pattern: '^-rf$'}]}}",
    )
    tenants = load_tenants(path, env="dev")
    assert refusal(tenants, "/bin/rm", "-rf", "/x") == "deny_args:^-rf$"
    assert refusal(tenants, "/bin/echo", "-rf") is None
    assert refusal(tenants, "/bin/rm", "-f", "/x") is None


def test_scoped_rules_compare_executables_after_resolving_symlinks(tmp_path: Path) -> None:
    link = tmp_path / "rm-link"
    link.symlink_to(os.path.realpath("/bin/rm"))
    path = write(
        tmp_path,
        f"tenants: {{ops: {{executables: [/bin/echo, {link}],"
        " deny_args: [{executable: /bin/rm}]}}",
    )
    tenants = load_tenants(path, env="dev")
    # The allow-list names the link, the rule names /bin/rm: one program, refused either way.
    assert refusal(tenants, str(link), "x") == "deny_executable:/bin/rm"


def test_an_executable_refused_outright_wins_over_an_earlier_pattern(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "tenants: {ops: {executables: [/bin/rm], deny_args: ['^-rf$', {executable: /bin/rm}]}}",
    )
    tenants = load_tenants(path, env="dev")
    assert refusal(tenants, "/bin/rm", "-rf", "/x") == "deny_executable:/bin/rm"


def test_a_refused_compensation_names_the_rule(tmp_path: Path) -> None:
    prod = load_tenants(write(tmp_path, BASE), env="prod")
    rule = refusal(prod, "/bin/echo", "hi", compensate=["/bin/rm", "/tmp/x"])
    assert rule == "deny_executable:/bin/rm"
    with pytest.raises(PolicyDenied, match="compensate"):
        policy.check_compensate(("/bin/rm", "/tmp/x"), prod.tenants["ops"])


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environments", "needle"),
    [
        ("{production: {deny_args: []}}", r"environments: unknown environment 'production'"),
        ("{prod: {surprise: 1}}", r"environments\.prod\.surprise"),
        ("{prod: {executables: []}}", "at least one executable"),
        ("{prod: {executables: null}}", r"environments\.prod\.executables"),
        ("{prod: {deny_args: [{executable: rm}]}}", "not an absolute path"),
        ("{prod: {deny_args: [{pattern: '^-rf$'}]}}", r"deny_args\.0\.scoped\.executable"),
        ("{prod: {deny_args: [{executable: /bin/rm, pattern: '('}]}}", "not a valid regex"),
        ("{prod: {limits: {timeout_s: 0}}}", r"limits\.timeout_s"),
        ("{prod: {run_as: {uid_min: 0, uid_max: 10, gid: 10}}}", r"run_as\.uid_min"),
        ("{prod: {run_as: {uid_min: 1000, uid_max: 65534, gid: 10}}}", r"run_as\.uid_max"),
        ("{prod: {run_as: {uid_min: 2000, uid_max: 1500, gid: 10}}}", "above uid_max"),
        ("{prod: {run_as: {uid_min: 2000, uid_max: 2000, gid: 0}}}", r"run_as\.gid"),
        ("{prod: {max_concurrent: 0}}", "max_concurrent"),
        ("{prod: {submit_rate: {per_s: 0, burst: 1}}}", r"submit_rate\.per_s"),
        ("{prod: {network: maybe}}", "network"),
    ],
)
def test_a_bad_override_is_refused_naming_the_field(
    tmp_path: Path, environments: str, needle: str
) -> None:
    path = write(
        tmp_path, f"tenants: {{ops: {{executables: [/bin/echo], environments: {environments}}}}}"
    )
    with pytest.raises(ConfigInvalid, match=needle) as caught:
        load_tenants(path, env="dev")
    assert str(path) in str(caught.value)


def test_run_as_accepts_a_sane_range(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "tenants: {ops: {executables: [/bin/echo],"
        " run_as: {uid_min: 1000, uid_max: 65533, gid: 1000}}}",
    )
    run_as = load_tenants(path, env="dev").tenants["ops"].run_as
    assert run_as is not None and (run_as.uid_min, run_as.uid_max) == (1000, 65533)


def test_a_null_override_resets_a_nullable_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "tenants: {ops: {executables: [/bin/echo], allowed_env: [LANG], max_concurrent: 3,"
        " environments: {dev: {allowed_env: null, max_concurrent: null}}}}",
    )
    dev = load_tenants(path, env="dev").tenants["ops"]
    assert dev.env_allow == DEFAULT_ENV_ALLOW and dev.max_concurrent is None
    prod = load_tenants(path, env="prod").tenants["ops"]
    assert prod.env_allow == ("LANG",) and prod.max_concurrent == 3


# --- the shipped file and its schema --------------------------------------------------------


def test_the_shipped_prod_tenant_keeps_dev_behaviour_and_tightens_in_prod() -> None:
    # `execq demo` runs in dev and expects exactly this refusal.
    assert refusal_of(load_tenants(SHIPPED, env="dev")) == "deny_options:-r"
    # An executable refused outright is named as such, before any option rule.
    assert refusal_of(load_tenants(SHIPPED, env="staging")) == "deny_executable:/bin/rm"
    # In production the prod tenant runs its actions only.
    assert refusal_of(load_tenants(SHIPPED, env="prod")) == "raw_argv"
    dev = load_tenants(SHIPPED, env="dev")
    with pytest.raises(PolicyDenied) as caught:
        policy.check(CommandSpec(tenant="prod", argv=["/bin/rm", "-R", "/srv/x"]), dev)
    assert caught.value.rule == "deny_options:-R" and "/bin/rm" in str(caught.value)
    policy.check(CommandSpec(tenant="prod", argv=["/bin/rm", "/srv/x/file"]), dev)


def refusal_of(tenants: TenantsFile) -> str:
    spec = CommandSpec(tenant="prod", argv=["/bin/rm", "-rf", "/srv/important"])
    with pytest.raises(PolicyDenied) as caught:
        policy.check(spec, tenants)
    return caught.value.rule


def test_the_published_schema_is_the_generated_one() -> None:
    committed = json.loads((ROOT / "config" / "tenants.schema.json").read_text())
    assert committed == tenants_json_schema(), (
        "config/tenants.schema.json is stale: run "
        "`execq config schema > config/tenants.schema.json`"
    )


def test_the_shipped_file_validates_against_the_schema() -> None:
    schema = tenants_json_schema()
    document = yaml.safe_load(SHIPPED.read_text())
    assert schema_errors(schema, document) == []
    # And the schema is no rubber stamp: it refuses what the loader refuses.
    bad = yaml.safe_load(SHIPPED.read_text())
    bad["tenants"]["prod"]["environments"]["production"] = {}
    bad["tenants"]["acme"]["run_as"] = {"uid_min": 0, "uid_max": 10, "gid": 0}
    bad["tenants"]["acme"]["deny_args"] = [{"pattern": "x"}]
    errors = schema_errors(schema, bad)
    assert any("environments" in e and "production" in e for e in errors), errors
    assert any("acme.run_as" in e for e in errors), errors
    assert any("deny_args.0" in e for e in errors), errors


def schema_errors(schema: dict[str, Any], doc: Any) -> list[str]:
    """The subset of JSON Schema the published schema uses (jsonschema is not a dependency)."""
    errors: list[str] = []

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = schema["$defs"][node["$ref"].rpartition("/")[2]]
        return node

    def typed(value: Any, kind: str) -> bool:
        checks: dict[str, bool] = {
            "object": isinstance(value, dict),
            "array": isinstance(value, list),
            "string": isinstance(value, str),
            "boolean": isinstance(value, bool),
            "null": value is None,
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, int | float) and not isinstance(value, bool),
        }
        return checks[kind]

    def check(node: dict[str, Any], value: Any, at: str) -> None:
        node = resolve(node)
        for key in ("anyOf", "oneOf"):
            if key in node:
                matches = [s for s in node[key] if not sub(s, value, at)]
                if not matches or (key == "oneOf" and len(matches) > 1):
                    errors.append(f"{at}: matches {len(matches)} of {key}")
        if "type" in node and not typed(value, node["type"]):
            errors.append(f"{at}: not {node['type']}")
            return
        if "enum" in node and value not in node["enum"]:
            errors.append(f"{at}: not one of {node['enum']}")
        for key, op in (
            ("minimum", lambda v, b: v >= b),
            ("maximum", lambda v, b: v <= b),
            ("exclusiveMinimum", lambda v, b: v > b),
            ("exclusiveMaximum", lambda v, b: v < b),
        ):
            if key in node and not op(value, node[key]):
                errors.append(f"{at}: {key} {node[key]}")
        if isinstance(value, dict):
            props = node.get("properties", {})
            errors.extend(
                f"{at}: {name} required" for name in node.get("required", ()) if name not in value
            )
            for name, item in value.items():
                where = f"{at}.{name}".lstrip(".")
                if name in props:
                    check(props[name], item, where)
                elif node.get("additionalProperties") is False:
                    errors.append(f"{at}: unexpected {name}")
                elif isinstance(node.get("additionalProperties"), dict):
                    check(node["additionalProperties"], item, where)
        if isinstance(value, list) and "items" in node:
            for i, item in enumerate(value):
                check(node["items"], item, f"{at}.{i}")

    def sub(node: dict[str, Any], value: Any, at: str) -> list[str]:
        before = len(errors)
        check(node, value, at)
        found = errors[before:]
        del errors[before:]
        return found

    check(schema, doc, "")
    return errors


# --- `execq config` -------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EXECQ_")}
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "config", *args],
        env={**base, "COLUMNS": "200", **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_check_shows_the_effective_policy_for_an_environment() -> None:
    done = run_cli("check", str(SHIPPED), "--env", "prod")
    assert done.returncode == 0, done.stderr
    assert "valid" in done.stdout and "EXECQ_ENV=prod" in done.stdout
    assert "deny_executable:/bin/rm" in done.stdout
    assert "prod overrides applied" in done.stdout
    for field in ("executables", "limits", "network", "run_as", "max_concurrent", "submit_rate"):
        assert field in done.stdout
    assert "snapshot_roots" in done.stdout
    dev = run_cli("check", str(SHIPPED))
    assert dev.returncode == 0, dev.stderr
    assert "deny_executable" not in dev.stdout and "deny_args:^/$" in dev.stdout
    assert "/bin/rm: --recursive -r -R" in dev.stdout and "actions only" in done.stdout


def test_config_check_reads_the_settings_by_default(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    done = run_cli("check", "--json", env={"EXECQ_TENANTS_FILE": str(path), "EXECQ_ENV": "prod"})
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["file"] == str(path) and shown["environment"] == "prod"
    ops = shown["tenants"]["ops"]
    assert ops["deny_rules"] == ["deny_executable:/bin/rm"]
    assert ops["run_as"] == {"uid_min": 20000, "uid_max": 20999, "gid": 20000}
    assert ops["submit_rate"] == {"per_s": 2.5, "burst": 10}
    assert ops["network"] is False and ops["max_concurrent"] == 4
    assert ops["limits"]["timeout_s"] == 60 and "environments" not in ops


def test_config_check_exits_2_naming_the_file_and_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "tenants: {ops: {executables: [/bin/echo],"
        " environments: {prod: {run_as: {uid_min: 0, uid_max: 5, gid: 1}}}}}",
    )
    done = run_cli("check", str(path))
    assert done.returncode == 2, done.stdout
    text = " ".join(done.stderr.split())
    assert str(path) in text and "tenants.ops.environments.prod.run_as.uid_min" in text
    as_json = run_cli("check", str(path), "--json")
    assert as_json.returncode == 2
    assert "run_as.uid_min" in json.loads(as_json.stdout)["error"]
    typo = write(tmp_path, "tenants: {ops: {executables: [/bin/echo], environments: {qa: {}}}}")
    done = run_cli("check", str(typo))
    assert done.returncode == 2 and "unknown environment 'qa'" in " ".join(done.stderr.split())
    assert run_cli("check", str(tmp_path / "missing.yaml")).returncode == 2
    assert run_cli("check", str(SHIPPED), "--env", "production").returncode == 2


def test_config_schema_prints_the_published_schema() -> None:
    done = run_cli("schema")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == tenants_json_schema()
    assert done.stdout == (ROOT / "config" / "tenants.schema.json").read_text()


def test_config_help_teaches_the_syntax() -> None:
    done = run_cli("--help")
    assert done.returncode == 0
    text = re.sub(r"[\s│]+", " ", done.stdout)
    assert "environments:" in text and "{executable: /bin/rm}" in text
