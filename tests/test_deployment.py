"""docker-compose.yml stays in step with the CLI and the tenants file (checked statically).

No Docker engine is needed: the file is parsed with PyYAML and every execq command in it is
parsed by the real CLI. The capabilities given to workers are checked by running the real
sandbox under exactly those capabilities (as root, like the container).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from typer.exceptions import TyperException
from typer.testing import CliRunner

from producer.settings import Environment
from producer.tenants import TenantsFile, load_tenants
from workers.cli import app
from workers.cli_compose import WorkerPlan, plan_workers, render_compose

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
TENANTS = ROOT / "config" / "tenants.yaml"
REGENERATE = "execq compose generate --output docker-compose.yml"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def written_tenants() -> TenantsFile:
    return load_tenants(TENANTS, env=Environment.DEV).as_written


def parse_cli(args: list[str]) -> Any:
    """Parse `execq ARGS` with the real command objects (their `make_context`), running nothing.

    Returns the click context; a bad option or a missing argument raises a usage error.
    """
    command: Any = typer.main.get_command(app)
    words = list(args)
    name = "execq"
    while hasattr(command, "commands") and words and words[0] in command.commands:
        name = words.pop(0)
        command = command.commands[name]
    assert not hasattr(command, "commands"), f"`execq {' '.join(args)}` names no command"
    return command.make_context(name, words)


def seconds(duration: str | int) -> float:
    """A Compose duration (`90s`, `1m30s`, `1h`) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", str(duration))
    assert parts, f"{duration!r} is not a duration"
    return sum(float(n) * units[u] for n, u in parts)


def execq_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if str(s.get("image", "")).startswith("execq:")}


def workers() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if s.get("command", [None])[0] == "worker"}


# --- the file is the generator's output ------------------------------------------------


def test_the_committed_file_is_what_the_generator_writes_for_the_tenants_file() -> None:
    expected = render_compose(load_tenants(TENANTS, env=Environment.DEV))
    assert COMPOSE.read_text() == expected, (
        "docker-compose.yml is out of date with config/tenants.yaml: run "
        f"`{REGENERATE}` and commit the result"
    )


def test_the_generate_command_prints_the_committed_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, ["compose", "generate"])
    assert result.exit_code == 0, result.output
    assert result.stdout == COMPOSE.read_text()


def test_the_generate_command_writes_a_file_and_names_its_workers(tmp_path: Path) -> None:
    target = tmp_path / "docker-compose.yml"
    result = CliRunner().invoke(
        app, ["compose", "generate", "--tenants", str(TENANTS), "--output", str(target), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["workers"] == [
        f"worker-{t}" for t in written_tenants().tenants
    ]
    text = target.read_text()
    # The tenants file is mounted by a path relative to where the compose file lives.
    assert f"- {os.path.relpath(TENANTS, tmp_path)}:/etc/execq/tenants.yaml:ro" in text


def test_a_missing_tenants_file_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "x.yaml"
    result = CliRunner().invoke(app, ["compose", "generate", "--tenants", str(missing), "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"error": f"--tenants {missing}: no such file"}


def test_a_tenant_added_without_regenerating_is_caught(tmp_path: Path) -> None:
    grown = tmp_path / "tenants.yaml"
    raw = yaml.safe_load(TENANTS.read_text())
    raw["tenants"]["newcomer"] = {"executables": ["/bin/echo"], "limits": {"timeout_s": 5}}
    grown.write_text(yaml.safe_dump(raw))
    regenerated = render_compose(load_tenants(grown, env=Environment.DEV))
    assert "worker-newcomer:" in regenerated
    assert regenerated != COMPOSE.read_text()


# --- workers ---------------------------------------------------------------------------


def test_every_tenant_has_exactly_one_worker_service_consuming_its_queue() -> None:
    consumers: dict[str, list[str]] = {}
    for name, svc in workers().items():
        ctx = parse_cli(svc["command"])
        consumers.setdefault(ctx.params["tenant"], []).append(name)
        assert name == f"worker-{ctx.params['tenant']}"
    expected = {t: [f"worker-{t}"] for t in written_tenants().tenants}
    assert consumers == expected


def test_worker_healthchecks_ask_the_port_the_worker_serves_healthz_on() -> None:
    for name, svc in workers().items():
        port = parse_cli(svc["command"]).params["metrics_port"]
        assert port, f"{name} serves no /healthz"
        assert f"127.0.0.1:{port}/healthz" in " ".join(svc["healthcheck"]["test"]), name


def test_workers_stop_grace_is_longer_than_the_largest_timeout_of_their_tenant() -> None:
    svcs = services()
    for name, tenant in written_tenants().tenants.items():
        largest = max(tenant.effective(env).limits.timeout_s for env in Environment)
        grace = seconds(svcs[f"worker-{name}"]["stop_grace_period"])
        assert grace > largest, f"worker-{name}: {grace} s <= {largest} s"


def test_workers_have_cpu_memory_and_pids_limits_that_fit_their_pool() -> None:
    svcs = services()
    for name, tenant in written_tenants().tenants.items():
        limits = svcs[f"worker-{name}"]["deploy"]["resources"]["limits"]
        views = [tenant.effective(env).limits for env in Environment]
        assert float(limits["cpus"]) >= tenant.concurrency
        memory_mb = int(str(limits["memory"]).removesuffix("M"))
        assert memory_mb > tenant.concurrency * max(v.memory_mb for v in views)
        assert limits["pids"] > tenant.concurrency * max(v.processes for v in views)


def test_workers_drop_every_capability_and_say_why_they_add_each_back() -> None:
    lines = COMPOSE.read_text().splitlines()
    for name, svc in workers().items():
        assert svc["cap_drop"] == ["ALL"], name
        assert svc["cap_add"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
    for i, line in enumerate(lines):
        if re.fullmatch(r"\s+- [A-Z_]+", line):
            assert lines[i - 1].strip().startswith("#"), f"line {i + 1}: {line.strip()} has no why"


def plan(**overrides: Any) -> WorkerPlan:
    base: dict[str, Any] = {
        "tenant": "t",
        "concurrency": 1,
        "timeout_s": 10.0,
        "memory_mb": 64,
        "processes": 8,
        "run_as": False,
        "root_in": ("dev", "staging", "prod"),
        "no_network": False,
        "filesystem": False,
    }
    return WorkerPlan(**{**base, **overrides})


def caps_of(p: WorkerPlan) -> list[str]:
    return [cap for cap, _ in p.capabilities()]


def test_capabilities_follow_the_isolation_a_tenant_asks_for(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(
        "tenants:\n"
        "  plain: {executables: [/bin/echo]}\n"
        "  offline: {executables: [/bin/echo], network: false}\n"
        "  jailed:\n"
        "    executables: [/bin/echo]\n"
        "    environments:\n"
        "      prod:\n"
        "        run_as: {uid_min: 20000, uid_max: 20001, gid: 20000}\n"
        "        filesystem: {}\n"
        "        network: false\n"
    )
    plans = {p.tenant: p for p in plan_workers(load_tenants(path, env=Environment.DEV))}
    assert caps_of(plans["plain"]) == ["DAC_OVERRIDE"]
    assert caps_of(plans["offline"]) == ["DAC_OVERRIDE", "SYS_ADMIN"]
    # An override in any environment counts: EXECQ_ENV is chosen when the stack starts.
    jailed = ["DAC_OVERRIDE", "CHOWN", "SETUID", "SETGID", "KILL", "SYS_ADMIN", "NET_ADMIN"]
    assert caps_of(plans["jailed"]) == jailed
    assert plans["jailed"].root_in == ("dev", "staging")
    text = render_compose(load_tenants(path, env=Environment.DEV))
    svcs = yaml.safe_load(text)["services"]
    # Only bubblewrap needs Docker's AppArmor and seccomp profiles lifted.
    assert "seccomp=unconfined" in svcs["worker-jailed"]["security_opt"]
    assert svcs["worker-offline"]["security_opt"] == ["no-new-privileges:true"]
    assert "In dev and staging (no run_as there) the commands run as root" in text


# The real sandbox, in a process whose capabilities are exactly a worker container's.
# Docker mounts /sys/fs/cgroup read-only in an unprivileged container: no cgroups here either.
SANDBOX_PROBE = """
import dataclasses, json, os, signal, sys, uuid
from pathlib import Path
from workers.sandbox import ExecRequest, Limits, Sandbox, detect_capabilities
from workers.sandbox.model import FsView

run_as, network, filesystem = json.loads(sys.argv[1])
caps = dataclasses.replace(
    detect_capabilities(), memory_v1=None, pids_v1=None, cgroup_v2=None, cgroup_kill=False
)
root = Path(sys.argv[2])
limits = Limits(timeout_s=1, cpu_s=5, memory_mb=256, processes=32, output_kb=64, file_mb=8)
exes = ("/usr/bin/id", "/bin/sh", "/bin/sleep", "/bin/mkdir", "/bin/chmod")
# A duration no other process uses, so this run's survivors (if any) can be told apart.
nap = f"20.{uuid.uuid4().int % 10**9:09d}"
extra = {"run_as": tuple(run_as) if run_as else None, "network": network,
         "filesystem": FsView() if filesystem else None}
out = {}
with Sandbox(workdir_root=root, capabilities=caps) as sandbox:
    for name, argv in [
        ("id", ("/usr/bin/id", "-u")),
        ("tree", ("/bin/sh", "-c", f"sleep {nap} & (setsid sleep {nap} &); sleep {nap}")),
        ("locked", ("/bin/sh", "-c", "mkdir -p a/b && chmod 000 a/b a && echo ok")),
    ]:
        try:
            r = sandbox.run(ExecRequest(command_id=name, argv=argv, allowed_executables=exes,
                                        limits=limits, **extra))
            out[name] = {"exit": r.exit_code, "killed": r.killed, "stdout": r.stdout.strip(),
                         "stderr": r.stderr.strip(), "duration_s": r.duration_s}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
out["left"] = sorted(str(p) for p in root.rglob("*"))
out["survivors"] = []
for entry in Path("/proc").iterdir():
    try:
        words = (entry / "cmdline").read_bytes().split(b"\\0")
        if entry.name.isdigit() and words[1:2] == [nap.encode()]:
            out["survivors"].append(int(entry.name))
            os.kill(int(entry.name), signal.SIGKILL)
    except OSError:
        pass
print(json.dumps(out))
"""


def run_sandbox_with(caps: list[str], *, run_as: bool, network: bool, fs: bool) -> dict[str, Any]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to give the sandbox a container's capabilities")
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in caps)])
    root = Path(tempfile.mkdtemp(prefix="execq-caps-"))
    try:
        done = subprocess.run(
            ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--",
             sys.executable, "-c", SANDBOX_PROBE,
             json.dumps([[20100, 20100] if run_as else None, network, fs]), str(root)],
            capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def assert_sandbox_works(result: dict[str, Any], uid: str) -> None:
    assert result["id"].get("stdout") == uid, result["id"]
    # Killed at its 1 s timeout, not left to end by itself 20 s later.
    assert result["tree"].get("killed") == "timeout", result["tree"]
    assert result["tree"]["duration_s"] < 10, result["tree"]
    assert result["locked"].get("stdout") == "ok", result["locked"]
    assert result["left"] == [], "a private directory was left behind"
    assert result["survivors"] == [], "part of a command's process tree survived its timeout"


def test_a_plain_tenants_worker_capabilities_are_enough_for_the_sandbox() -> None:
    p = plan()
    assert_sandbox_works(run_sandbox_with(caps_of(p), run_as=False, network=True, fs=False), "0")


def test_a_run_as_tenant_without_network_gets_what_its_sandbox_needs() -> None:
    p = plan(run_as=True, root_in=(), no_network=True)
    result = run_sandbox_with(caps_of(p), run_as=True, network=False, fs=False)
    assert_sandbox_works(result, "20100")


def test_without_dac_override_a_run_as_command_cannot_even_start() -> None:
    caps = [c for c in caps_of(plan(run_as=True, root_in=())) if c != "DAC_OVERRIDE"]
    result = run_sandbox_with(caps, run_as=True, network=True, fs=False)
    assert "Permission denied" in result["id"].get("error", ""), result["id"]


def test_a_filesystem_view_without_network_gets_what_bubblewrap_needs() -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")
    p = plan(run_as=True, root_in=(), no_network=True, filesystem=True)
    result = run_sandbox_with(caps_of(p), run_as=True, network=False, fs=True)
    assert_sandbox_works(result, "20100")


# --- every service ---------------------------------------------------------------------


def test_every_service_command_parses_against_the_real_cli() -> None:
    for name, svc in execq_services().items():
        if "command" in svc:
            parse_cli(svc["command"])
        test = svc["healthcheck"]["test"]
        if test[1] == "execq":
            parse_cli(test[2:])
        assert svc["image"].startswith("execq:"), name
    # The check itself can fail: a misspelt option or a missing argument is refused.
    with pytest.raises(TyperException, match="No such option"):
        parse_cli(["worker", "--tennant", "acme"])
    with pytest.raises(TyperException, match="Missing parameter: tenant"):
        parse_cli(["worker"])


def test_every_service_has_a_healthcheck_that_runs_something() -> None:
    for name, svc in services().items():
        check = svc.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in {"CMD", "CMD-SHELL"} and len(check["test"]) > 1, name
        assert seconds(check["timeout"]) < seconds(check["interval"]), name


def test_the_collectors_healthcheck_runs_the_probe_its_image_adds() -> None:
    svc = services()["otel-collector"]
    dockerfile = ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]
    copied = re.findall(r"^COPY --from=\S+ \S+ (\S+)$", dockerfile.read_text(), re.M)
    assert svc["healthcheck"]["test"][1] in copied
    config = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    assert "health_check" in config["service"]["extensions"]
    endpoint = config["extensions"]["health_check"]["endpoint"]
    assert f"http://{endpoint}/" in svc["healthcheck"]["test"]


def test_every_referenced_variable_is_in_env_example() -> None:
    text = COMPOSE.read_text()
    # `$$` is Compose's escape for a literal `$`, resolved inside the container.
    used = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    used |= set(re.findall(r"(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)", text))
    listed = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M))
    assert used - listed == set(), "add these to .env.example"
    assert listed - used == set(), "docker-compose.yml does not read these"


def test_secrets_have_no_defaults_and_stop_compose_when_missing() -> None:
    text = COMPOSE.read_text()
    secrets = (
        "REDIS_PASSWORD",
        "POSTGRES_PASSWORD",
        "EXECQ_SIGNING_KEY",
        "EXECQ_SECRETS_KEY",
        "EXECQ_AUDIT_KEY",
    )
    for name in (*secrets, "FLOWER_BASIC_AUTH"):
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses, name
        assert all(u.startswith(":?") for u in uses), f"{name} must be required: {uses}"


def test_volumes_dependencies_and_build_contexts_refer_to_what_exists() -> None:
    doc = compose()
    svcs, volumes = doc["services"], doc["volumes"]
    for name, svc in svcs.items():
        for dep in svc.get("depends_on", {}):
            assert dep in svcs, f"{name} depends on unknown service {dep}"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} mounts undeclared volume {source}"
        build = svc.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build["context"])
            dockerfile = "Dockerfile" if isinstance(build, str) else build["dockerfile"]
            assert (context / dockerfile).is_file(), f"{name}: no {context / dockerfile}"
    waits_for_migration = {n for n, s in svcs.items() if "migrate" in s.get("depends_on", {})}
    assert set(workers()) | {"gateway", "flower", "cli"} <= waits_for_migration


def test_redis_persists_needs_a_password_and_never_evicts() -> None:
    redis = services()["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert "--requirepass ${REDIS_PASSWORD:?" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services()["postgres"]["volumes"])


def test_the_migration_runs_once_and_upgrades_the_store() -> None:
    migrate = services()["migrate"]
    assert migrate["restart"] == "no"
    assert parse_cli(migrate["command"]).command.name == "upgrade"


def test_traces_go_to_a_collector_that_forwards_them_to_jaeger() -> None:
    svcs = services()
    endpoint = svcs["worker-acme"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint == "http://otel-collector:4318"
    collector = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    assert "http" in collector["receivers"]["otlp"]["protocols"]
    exporter = collector["exporters"]["otlp/jaeger"]
    assert exporter["endpoint"].split(":")[0] in svcs
    assert collector["service"]["pipelines"]["traces"]["exporters"] == ["otlp/jaeger"]


def test_flower_cannot_start_without_a_password_and_listens_on_loopback_only() -> None:
    flower = services()["flower"]
    assert parse_cli(flower["command"]).command.name == "flower"
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    for svc in services().values():
        assert all(p.startswith("127.0.0.1:") for p in svc.get("ports", []))


def test_execq_healthchecks_run_programs_the_image_has() -> None:
    # The image installs no curl or wget: a probe written with them would never pass.
    installed = " ".join(re.findall(r"apt-get install (.*)", (ROOT / "Dockerfile").read_text()))
    assert "curl" not in installed and "wget" not in installed
    for name, svc in execq_services().items():
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] in {"execq", "python"}, name


# --- the HTTP gateway -----------------------------------------------------------------


def test_the_gateway_listens_in_its_container_and_is_published_on_loopback_only() -> None:
    gateway = services()["gateway"]
    ctx = parse_cli(gateway["command"])
    assert ctx.command.name == "gateway"
    # 127.0.0.1 inside the container would be unreachable through the published port.
    assert ctx.params["host"] == "0.0.0.0"
    port = ctx.params["port"]
    assert gateway["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert gateway["restart"] == "unless-stopped"


def test_the_gateways_healthcheck_asks_its_healthz_the_way_the_workers_do() -> None:
    gateway = services()["gateway"]
    port = parse_cli(gateway["command"]).params["port"]
    test = gateway["healthcheck"]["test"]
    worker = next(iter(workers().values()))
    worker_port = parse_cli(worker["command"]).params["metrics_port"]
    worker_test = worker["healthcheck"]["test"]
    assert test[:3] == worker_test[:3] == ["CMD", "python", "-c"]
    assert f"127.0.0.1:{port}/healthz" in test[3]
    assert test[3] == worker_test[3].replace(f":{worker_port}/", f":{port}/")
    assert seconds(gateway["healthcheck"]["start_period"]) > 0


def test_the_gateway_waits_for_the_store_and_redis_and_shares_the_producers_settings() -> None:
    svcs = services()
    gateway, worker = svcs["gateway"], svcs["worker-acme"]
    assert gateway["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "redis": {"condition": "service_healthy"},
    }
    # It submits like any producer: the same store, broker, signing, sealing and audit keys.
    assert gateway["environment"] == worker["environment"]
    assert gateway["volumes"] == worker["volumes"]
    # It runs no command itself: no capability back, unlike a worker.
    assert gateway["cap_drop"] == ["ALL"]
    assert "cap_add" not in gateway
    assert gateway["security_opt"] == ["no-new-privileges:true"]


def test_the_stack_signs_messages_and_uses_the_redis_password() -> None:
    env = services()["worker-acme"]["environment"]
    # `:?` makes `docker compose up` stop with that message when no key is set.
    assert env["EXECQ_SIGNING_KEY"].startswith("${EXECQ_SIGNING_KEY:?")
    # Every producer and worker container seals and opens with the same master key.
    assert env["EXECQ_SECRETS_KEY"].startswith("${EXECQ_SECRETS_KEY:?")
    assert env["EXECQ_AUDIT_KEY"].startswith("${EXECQ_AUDIT_KEY:?")
    assert env["EXECQ_AUDIT_WITNESS"].startswith("/var/lib/execq/audit/")
    assert env["EXECQ_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD:?")


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the docker client is not installed")
    if subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode:
        pytest.skip("the docker compose plugin is not installed (Debian: docker-compose-plugin)")
    env = {
        **os.environ,
        "REDIS_PASSWORD": "x",
        "POSTGRES_PASSWORD": "x",
        "EXECQ_SIGNING_KEY": "x",
        "EXECQ_SECRETS_KEY": "x",
        "EXECQ_AUDIT_KEY": "x",
        "FLOWER_BASIC_AUTH": "u:p",
    }
    # `config` resolves and validates the file against the compose-spec; it needs no engine.
    done = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True, text=True, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
