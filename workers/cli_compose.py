"""`execq compose generate`: the Docker Compose file of one host, derived from the tenants file.

Each tenant gets one worker service sized from its limit ceilings (the largest value any of its
environments allows, since EXECQ_ENV is chosen when the stack starts) and given only the Linux
capabilities its isolation settings need. The text is built here rather than dumped from a dict
so that it keeps the comments saying why; it is deterministic, so CI can compare it with the
committed file.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from producer.settings import Environment
from producer.tenants import TenantsFile, load_tenants
from workers.cli_gateway import DEFAULT_PORT as GATEWAY_PORT
from workers.clikit import JsonOpt, fail, handled, out

compose_app = typer.Typer(
    help="Docker Compose deployment: one worker service per tenant of the tenants file.",
    no_args_is_help=True,
)

METRICS_PORT = 9100
# Beyond a command's timeout: the TERM grace, the kill, and recording the result.
STOP_MARGIN_S = 30
# Measured resident size of a worker's main process and of one pool process, rounded up.
MAIN_PROCESS_MB = 192
POOL_PROCESS_MB = 128
# Threads count as pids: Celery, the reaper, the metrics server, the trace exporter, probes.
BASE_PIDS = 64
PIDS_PER_POOL_PROCESS = 8
COMMENT_WIDTH = 96

# Capability -> why the sandbox needs it (checked by running the sandbox under exactly these).
WHY_DAC_OVERRIDE = (
    "Removes each command's private directory whatever modes the command left on what it "
    "wrote there (a subdirectory chmod 000 included)."
)
WHY_DAC_OVERRIDE_RUN_AS = (
    "Enters and removes each command's private directory, which belongs to the tenant's uid "
    "(0700), whatever modes the command left inside it."
)
WHY_CHOWN = "Hands each command's private directory to the tenant's uid."
WHY_SETUID = "execq-launch (or setpriv) switches each command to one of the tenant's uids."
WHY_SETGID = "execq-launch (or setpriv) switches to the tenant's gid, with no other groups."
WHY_KILL = "Signals (timeout, revoke, cleanup) process trees running under the tenant's uids."
WHY_SYS_ADMIN_NET = (
    "Gives each command a network namespace of its own (unshare --net); Docker's seccomp "
    "profile also allows unshare only with SYS_ADMIN."
)
WHY_SYS_ADMIN_FS = (
    "The bubblewrap wrapper creates mount, PID and IPC namespaces and mounts each "
    "command's read-only view."
)
WHY_NET_ADMIN = "The bubblewrap wrapper brings up the loopback of each command's network namespace."


@dataclass(frozen=True)
class WorkerPlan:
    """What one tenant's worker service needs, over every environment of the tenants file."""

    tenant: str
    concurrency: int
    timeout_s: float
    memory_mb: int
    processes: int
    run_as: bool
    no_network: bool
    # Environments in which the commands keep the worker's root identity (no run_as).
    root_in: tuple[str, ...]
    filesystem: bool

    @property
    def service(self) -> str:
        """The Compose service name: `worker-<tenant>`."""
        return f"worker-{self.tenant}"

    @property
    def stop_grace_s(self) -> int:
        """Longer than the longest command, so a warm shutdown lets it finish and be recorded."""
        return math.ceil(self.timeout_s) + STOP_MARGIN_S

    @property
    def memory_limit_mb(self) -> int:
        """The main process, and each pool process with the largest command it may run."""
        return MAIN_PROCESS_MB + self.concurrency * (POOL_PROCESS_MB + self.memory_mb)

    @property
    def pids_limit(self) -> int:
        """A backstop for the per-command process ceiling, which a container cannot enforce."""
        return BASE_PIDS + self.concurrency * (PIDS_PER_POOL_PROCESS + self.processes)

    @property
    def cpus(self) -> str:
        """One CPU per pool process plus half of one for the main process."""
        return f"{self.concurrency + 0.5:g}"

    def capabilities(self) -> list[tuple[str, str]]:
        """(capability, why) for `cap_add`, in a fixed order."""
        caps = [("DAC_OVERRIDE", WHY_DAC_OVERRIDE_RUN_AS if self.run_as else WHY_DAC_OVERRIDE)]
        if self.run_as:
            caps += [
                ("CHOWN", WHY_CHOWN),
                ("SETUID", WHY_SETUID),
                ("SETGID", WHY_SETGID),
                ("KILL", WHY_KILL),
            ]
        if self.filesystem:
            caps.append(("SYS_ADMIN", WHY_SYS_ADMIN_FS))
            if self.no_network:
                caps.append(("NET_ADMIN", WHY_NET_ADMIN))
        elif self.no_network:
            caps.append(("SYS_ADMIN", WHY_SYS_ADMIN_NET))
        return caps


def plan_workers(tenants: TenantsFile) -> list[WorkerPlan]:
    """One plan per tenant, in the file's order, taking the most any environment allows."""
    plans = []
    for name, tenant in tenants.as_written.tenants.items():
        views_by_env = {env: tenant.effective(env) for env in Environment}
        views = list(views_by_env.values())
        plans.append(
            WorkerPlan(
                tenant=name,
                concurrency=tenant.concurrency,
                timeout_s=max(v.limits.timeout_s for v in views),
                memory_mb=max(v.limits.memory_mb for v in views),
                processes=max(v.limits.processes for v in views),
                run_as=any(v.run_as is not None for v in views),
                root_in=tuple(e.value for e, v in views_by_env.items() if v.run_as is None),
                no_network=any(not v.network for v in views),
                filesystem=any(v.filesystem is not None for v in views),
            )
        )
    return plans


def _comment(text: str, indent: int) -> list[str]:
    pad = " " * indent
    return [f"{pad}# {line}" for line in textwrap.wrap(text, width=COMMENT_WIDTH - indent - 2)]


def _root_note(plan: WorkerPlan) -> str | None:
    """Commands that stay root inherit every capability of the worker: say where that is."""
    if not plan.root_in:
        return None
    if len(plan.root_in) == len(Environment):
        return (
            "Without run_as the commands run as root, though with no capability and "
            "no_new_privs (execq-launch drops them)."
        )
    where = " and ".join(plan.root_in)
    return (
        f"In {where} (no run_as there) the commands run as root, without capabilities "
        "(execq-launch drops them)."
    )


def _worker_service(plan: WorkerPlan) -> str:
    lines = [
        f"  {plan.service}:",
        "    <<: *worker",
        f'    command: ["worker", "--tenant", "{plan.tenant}", "--metrics-port", "{METRICS_PORT}"]',
    ]
    lines += _comment(
        f"A command of {plan.tenant} may run {plan.timeout_s:g} s: SIGTERM starts a warm "
        "shutdown that lets it finish and be recorded before Docker sends SIGKILL.",
        4,
    )
    lines += [f"    stop_grace_period: {plan.stop_grace_s}s", "    cap_add:"]
    note = _root_note(plan)
    if note is not None:
        lines += _comment(note, 6)
    for cap, why in plan.capabilities():
        lines += [*_comment(why, 6), f"      - {cap}"]
    if plan.filesystem:
        lines += _comment(
            "Docker's AppArmor profile denies every mount, and its seccomp profile the "
            "namespaces bubblewrap builds. A worker whose tenant requires the view refuses "
            "to start when bubblewrap still cannot build it, so trying a tighter profile "
            "is safe.",
            4,
        )
        lines += [
            "    security_opt:",
            '      - "no-new-privileges:true"',
            "      - apparmor=unconfined",
            "      - seccomp=unconfined",
        ]
    lines += [
        "    deploy:",
        "      resources:",
        "        limits:",
        f'          cpus: "{plan.cpus}"',
        f"          memory: {plan.memory_limit_mb}M",
        f"          pids: {plan.pids_limit}",
    ]
    return "\n".join(lines) + "\n"


HEADER = """\
# GENERATED by `execq compose generate` from {tenants_ref}: do not edit by hand.
# After changing the tenants file, regenerate it (CI fails until you do):
#   execq compose generate --tenants {tenants_ref} --output docker-compose.yml
#
# execq on one host: Redis (AOF, password, noeviction), PostgreSQL, a one-shot migration,
# one worker service per tenant, the HTTP gateway, Flower (password), an OpenTelemetry
# Collector and Jaeger.
#   cp .env.example .env   # then fill it in
#   docker compose up -d --build
#   docker compose run --rm cli submit --tenant {first} --wait -- /bin/echo hello
#   docker compose run --rm cli token create --tenant {first} --scope submit,read
# Gateway: http://127.0.0.1:{gateway_port}   Flower: http://127.0.0.1:5555
# Jaeger: http://127.0.0.1:16686   docs/deployment.md and docs/gateway.md say more.
name: execq

x-logging: &logging
  driver: json-file
  options:
    max-size: 10m
    max-file: "5"

x-execq-env: &execq-env
  EXECQ_BROKER_URL: "redis://:${{REDIS_PASSWORD:?set REDIS_PASSWORD in .env}}@redis:6379/0"
  EXECQ_DATABASE_URL: "postgresql+psycopg://execq:${{POSTGRES_PASSWORD:?set POSTGRES_PASSWORD \
in .env}}@postgres:5432/execq"
  EXECQ_TENANTS_FILE: /etc/execq/tenants.yaml
  # One chained audit file for every execq container of this host (appends take a flock).
  EXECQ_AUDIT_LOG: /var/lib/execq/audit/audit.jsonl
  # Signed checkpoints of every chain's head, outside the store: ship this file elsewhere too.
  EXECQ_AUDIT_WITNESS: /var/lib/execq/audit/audit-witness.jsonl
  # Links the audit chains (HMAC) and signs their checkpoints: the same everywhere.
  EXECQ_AUDIT_KEY: "${{EXECQ_AUDIT_KEY:?set EXECQ_AUDIT_KEY in .env (openssl rand -hex 32)}}"
  EXECQ_ENV: "${{EXECQ_ENV:-prod}}"
  EXECQ_LEASE_S: "30"
  EXECQ_LOG_FORMAT: json
  # Workers run only messages signed with this key; producers need the same key.
  EXECQ_SIGNING_KEY: "${{EXECQ_SIGNING_KEY:?set EXECQ_SIGNING_KEY in .env (openssl rand -hex 32)}}"
  # Seals secret values in messages (a key per tenant derived from it): the same everywhere.
  EXECQ_SECRETS_KEY: "${{EXECQ_SECRETS_KEY:?set EXECQ_SECRETS_KEY in .env (openssl rand -hex 32)}}"
  OTEL_EXPORTER_OTLP_ENDPOINT: http://otel-collector:4318
  OTEL_RESOURCE_ATTRIBUTES: "deployment.environment=${{EXECQ_ENV:-prod}}"

# What every execq container shares. Nothing of execq needs a capability outside the
# workers, and a worker gets only those its tenant's isolation settings need.
x-execq: &execq
  image: "execq:${{EXECQ_VERSION:-latest}}"
  build: .
  # PID 1 forwards SIGTERM to execq and reaps orphans that nothing else waits for.
  init: true
  environment: *execq-env
  volumes:
    - {tenants_ref}:/etc/execq/tenants.yaml:ro
    - audit:/var/lib/execq/audit
  cap_drop: [ALL]
  security_opt: ["no-new-privileges:true"]
  logging: *logging

# A worker: `execq worker` runs the reaper (lost workers, outbox) in-process, so no other
# process is needed. No capability for cgroups: Docker mounts /sys/fs/cgroup read-only in an
# unprivileged container, so a command's memory ceiling falls back to RLIMIT_AS and the
# container limits (memory, pids) are the backstop for the whole pool.
x-worker: &worker
  <<: *execq
  restart: unless-stopped
  depends_on:
    migrate:
      condition: service_completed_successfully
    redis:
      condition: service_healthy
  # /healthz answers 503 when the worker cannot reach Redis or the store.
  healthcheck:
    test: ["CMD", "python", "-c", "import sys, urllib.request; \
sys.exit(urllib.request.urlopen('http://127.0.0.1:{port}/healthz', timeout=3).status != 200)"]
    interval: 15s
    timeout: 5s
    retries: 3
    start_period: 30s

services:
  redis:
    image: redis:7.4-bookworm
    # AOF: an accepted message survives a restart. noeviction: when full, Redis refuses new
    # messages (producers keep them in the store's outbox) instead of dropping queued ones.
    command: ["redis-server", "--appendonly", "yes", "--appendfsync", "everysec",
              "--maxmemory", "${{REDIS_MAXMEMORY:-512mb}}", "--maxmemory-policy", "noeviction",
              "--requirepass", "${{REDIS_PASSWORD:?set REDIS_PASSWORD in .env}}"]
    environment:
      REDISCLI_AUTH: "${{REDIS_PASSWORD:?set REDIS_PASSWORD in .env}}"
    volumes: [redis-data:/data]
    restart: unless-stopped
    healthcheck:
      test: ["CMD-SHELL", "redis-cli ping | grep -q PONG"]
      interval: 5s
      timeout: 3s
      retries: 10
    logging: *logging

  postgres:
    image: postgres:16-bookworm
    environment:
      POSTGRES_USER: execq
      POSTGRES_DB: execq
      POSTGRES_PASSWORD: "${{POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}}"
    volumes: [postgres-data:/var/lib/postgresql/data]
    restart: unless-stopped
    healthcheck:
      test: ["CMD", "pg_isready", "-U", "execq", "-d", "execq"]
      interval: 5s
      timeout: 3s
      retries: 10
    logging: *logging

  # Creates or migrates the store, then exits; everything that reads the store waits for it.
  migrate:
    <<: *execq
    command: ["db", "upgrade"]
    restart: "no"
    depends_on:
      postgres:
        condition: service_healthy
    # Healthy once the store answers with the current schema. No tenant may be called
    # HEALTHCHECK (names are lower-case), so no command's output lands in `docker inspect`.
    healthcheck: &store-healthcheck
      test: ["CMD", "execq", "list", "--tenant", "HEALTHCHECK", "--limit", "1", "--json"]
      interval: 30s
      timeout: 10s
      retries: 3
      start_period: 20s

{workers}
  # The HTTP gateway (docs/gateway.md): a producer like any other, so it needs the store, Redis
  # and the same signing, sealing and audit keys, and no capability at all. Loopback only:
  # put a TLS-terminating proxy in front of it for other hosts.
  gateway:
    <<: *execq
    command: ["gateway", "--host", "0.0.0.0", "--port", "{gateway_port}"]
    ports: ["127.0.0.1:{gateway_port}:{gateway_port}"]
    restart: unless-stopped
    depends_on:
      migrate:
        condition: service_completed_successfully
      redis:
        condition: service_healthy
    # /healthz needs no token and answers 503 when the gateway cannot reach the store. The
    # image has no curl: Python asks, as for the workers.
    healthcheck:
      test: ["CMD", "python", "-c", "import sys, urllib.request; \
sys.exit(urllib.request.urlopen('http://127.0.0.1:{gateway_port}/healthz', timeout=3).status \
!= 200)"]
      interval: 15s
      timeout: 5s
      retries: 3
      start_period: 20s

  flower:
    <<: *execq
    command: ["flower", "--port", "5555", "--address", "0.0.0.0"]
    environment:
      <<: *execq-env
      # user:password; Flower refuses to start without it.
      FLOWER_BASIC_AUTH: "${{FLOWER_BASIC_AUTH:?set FLOWER_BASIC_AUTH=user:password in .env}}"
    ports: ["127.0.0.1:5555:5555"]
    restart: unless-stopped
    depends_on:
      migrate:
        condition: service_completed_successfully
      redis:
        condition: service_healthy
    # Every Flower path needs the login, /healthcheck too: the probe sends the first one.
    healthcheck:
      test: ["CMD", "python", "-c", "import base64, os, sys, urllib.request; \
login = base64.b64encode(os.environ['FLOWER_BASIC_AUTH'].split(',')[0].encode()).decode(); \
probe = urllib.request.Request('http://127.0.0.1:5555/healthcheck', \
headers={{'Authorization': 'Basic ' + login}}); \
sys.exit(urllib.request.urlopen(probe, timeout=3).status != 200)"]
      interval: 15s
      timeout: 5s
      retries: 3
      start_period: 20s

  # The upstream image is FROM scratch (no shell, no wget): deploy/otel-collector.Dockerfile
  # adds a static busybox for the healthcheck, which asks the health_check extension.
  otel-collector:
    image: "execq-otel-collector:0.115.0"
    build:
      context: deploy
      dockerfile: otel-collector.Dockerfile
    command: ["--config=/etc/otelcol/config.yaml"]
    volumes:
      - ./deploy/otel-collector.yaml:/etc/otelcol/config.yaml:ro
    restart: unless-stopped
    depends_on:
      jaeger:
        condition: service_healthy
    healthcheck:
      test: ["CMD", "/healthcheck/busybox", "wget", "-q", "-O", "/dev/null",
             "http://127.0.0.1:13133/"]
      interval: 10s
      timeout: 5s
      retries: 3
      start_period: 10s
    # Above the memory_limiter of deploy/otel-collector.yaml (400 MiB), so it acts first.
    deploy:
      resources:
        limits:
          memory: 512M
    logging: *logging

  # Traces stay in memory (the newest MEMORY_MAX_TRACES); send them elsewhere for keeps.
  jaeger:
    image: jaegertracing/all-in-one:1.64.0
    environment:
      COLLECTOR_OTLP_ENABLED: "true"
      MEMORY_MAX_TRACES: "${{JAEGER_MAX_TRACES:-50000}}"
    ports: ["127.0.0.1:16686:16686"]
    restart: unless-stopped
    # The image is Alpine-based: busybox wget asks the admin port's health endpoint.
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:14269/"]
      interval: 10s
      timeout: 5s
      retries: 3
      start_period: 10s
    logging: *logging

  # Operators' CLI: `docker compose run --rm cli <command>` (not started by `up`).
  cli:
    <<: *execq
    profiles: [tools]
    depends_on:
      migrate:
        condition: service_completed_successfully
    healthcheck: *store-healthcheck

volumes:
  redis-data:
  postgres-data:
  audit:
"""


def render_compose(tenants: TenantsFile, *, tenants_ref: str = "./config/tenants.yaml") -> str:
    """The whole docker-compose.yml for `tenants`; `tenants_ref` is the file as Compose sees it
    (relative to the compose file)."""
    plans = plan_workers(tenants)
    workers = "\n".join(_worker_service(p) for p in plans)
    return HEADER.format(
        tenants_ref=tenants_ref,
        first=plans[0].tenant,
        port=METRICS_PORT,
        gateway_port=GATEWAY_PORT,
        workers=workers,
    )


def _reference(tenants_file: Path, output: Path | None) -> str:
    """How the compose file names the tenants file: relative to where the compose file lives."""
    base = output.resolve().parent if output is not None else Path.cwd()
    rel = os.path.relpath(tenants_file.resolve(), base)
    return rel if rel.startswith("../") else f"./{rel}"


@compose_app.command("generate")
@handled
def generate(
    tenants: Annotated[
        Path, typer.Option("--tenants", help="Tenants file the services are made from.")
    ] = Path("config/tenants.yaml"),
    output: Annotated[
        str, typer.Option("--output", help="File to write, or - for standard output.")
    ] = "-",
    as_json: JsonOpt = False,
) -> None:
    """Write docker-compose.yml: one worker service per tenant, sized from its limits.

    Run it again whenever the tenants file changes:
    [bold]execq compose generate --output docker-compose.yml[/].
    """
    if not tenants.is_file():
        fail(f"--tenants {tenants}: no such file", 2, as_json=as_json)
    loaded = load_tenants(tenants, env=Environment.DEV)
    target = None if output == "-" else Path(output)
    text = render_compose(loaded, tenants_ref=_reference(tenants, target))
    services = [p.service for p in plan_workers(loaded)]
    if target is None:
        if as_json:
            print(json.dumps({"output": "-", "workers": services, "compose": text}))
        else:
            print(text, end="")
        return
    target.write_text(text, encoding="utf-8")
    if as_json:
        print(json.dumps({"output": str(target), "workers": services}))
    else:
        out.print(
            f"{target}: {len(services)} worker service(s): {', '.join(services)}", soft_wrap=True
        )
