"""docker-compose.yml stays in step with the CLI and the tenants file (checked statically)."""

from __future__ import annotations

from pathlib import Path

import yaml

from config.tenants import load_tenants
from workers.cli import app

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, object]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_tenant_has_a_worker_service() -> None:
    tenants = load_tenants(ROOT / "config" / "tenants.yaml")
    services = compose()["services"]
    assert isinstance(services, dict)
    for name in tenants.tenants:
        svc = services[f"worker-{name}"]
        assert svc["command"][:3] == ["worker", "--tenant", name]
        # Its healthcheck asks the port it serves /healthz on.
        port = svc["command"][svc["command"].index("--metrics-port") + 1]
        assert f":{port}/healthz" in " ".join(svc["healthcheck"]["test"])


def test_every_service_command_is_a_real_cli_command() -> None:
    import typer.main

    click_app = typer.main.get_command(app)
    services = compose()["services"]
    assert isinstance(services, dict)
    for name, svc in services.items():
        if svc.get("image", "").startswith("execq") and "command" in svc:
            words = [w for w in svc["command"] if not w.startswith("-")]
            group = click_app
            for word in words[:2]:
                sub = getattr(group, "commands", {}).get(word)
                if sub is None:
                    break
                group = sub
            assert group is not click_app, f"{name}: {svc['command']} is not an execq command"


def test_workers_stop_grace_is_longer_than_the_largest_timeout() -> None:
    tenants = load_tenants(ROOT / "config" / "tenants.yaml")
    services = compose()["services"]
    assert isinstance(services, dict)
    grace = services["worker-acme"]["stop_grace_period"]
    assert int(str(grace).rstrip("s")) > tenants.largest_timeout_s


def test_traces_go_to_a_collector_that_forwards_them_to_jaeger() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    endpoint = services["worker-acme"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint == "http://otel-collector:4318"
    collector = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    assert "http" in collector["receivers"]["otlp"]["protocols"]
    exporter = collector["exporters"]["otlp/jaeger"]
    assert exporter["endpoint"].split(":")[0] in services
    assert collector["service"]["pipelines"]["traces"]["exporters"] == ["otlp/jaeger"]


def test_flower_cannot_start_without_a_password() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    flower = services["flower"]
    assert flower["command"][0] == "flower"
    assert ":?" in flower["environment"]["FLOWER_BASIC_AUTH"]
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"])


def test_the_stack_signs_messages_and_redis_wants_a_password() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    env = services["worker-acme"]["environment"]
    # `:?` makes `docker compose up` stop with that message when no key is set.
    assert env["EXECQ_SIGNING_KEY"].startswith("${EXECQ_SIGNING_KEY:?")
    assert env["EXECQ_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD")
    assert "--requirepass" in services["redis"]["command"]
