"""EXECQ_NAMESPACE: two deployments with the same tenants on one Redis database stay apart."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.broker import celery_config, make_celery, queue_key
from producer.client import Producer
from producer.redisconn import database_of
from producer.settings import Settings
from producer.spec import CommandSpec
from producer.states import State
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.tenants import load_tenants
from tests.conftest import TENANTS_YAML, Env, WorkerProc, start_worker, wait_for

pytestmark = pytest.mark.slow

NAMESPACES = ("blue", "green")


def test_the_settings_name_redis_keys_and_queues_after_the_namespace() -> None:
    settings = Settings(namespace="blue")
    tenants = load_tenants(Path("config/tenants.yaml"))
    tenant = next(iter(tenants.tenants.values()))
    assert settings.key("rate", tenant.name) == f"blue.rate.{tenant.name}"
    assert queue_key(settings, tenant) == f"blue.{tenant.name}"
    assert queue_key(Settings(), tenant) == f"execq.{tenant.name}"
    options = celery_config(settings, tenants, "redis://127.0.0.1:6379/0")
    assert options["broker_transport_options"]["global_keyprefix"] == "blue."


def _deployment(env: Env, namespace: str, tenants_path: Path) -> Env:
    """`env` with a namespace, a store, a tenants file and an audit file of its own."""
    root = env.root / namespace
    root.mkdir()
    database_url = f"sqlite:///{root}/execq.db"
    engine = make_engine(database_url)
    upgrade(engine)
    engine.dispose()
    values = {
        **env.vars,
        "EXECQ_NAMESPACE": namespace,
        "EXECQ_DATABASE_URL": database_url,
        "EXECQ_TENANTS_FILE": str(tenants_path),
        "EXECQ_AUDIT_LOG": str(root / "audit.jsonl"),
        "EXECQ_AUDIT_WITNESS": str(root / "audit-witness.jsonl"),
    }
    settings = env.settings.model_copy(
        update={
            "namespace": namespace,
            "database_url": database_url,
            "tenants_file": tenants_path,
            "audit_log": root / "audit.jsonl",
        }
    )
    return dataclasses.replace(
        env, vars=values, settings=settings, tenants=load_tenants(tenants_path)
    )


class KeyWatch:
    """Every key and pub/sub channel seen in the Redis database while it runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url)
        self.keys: set[str] = set()
        self.channels: set[str] = set()
        self._stop = threading.Event()
        self._pubsub = self.client.pubsub()
        self._pubsub.psubscribe("*")
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.05)
            if message and message["type"] == "pmessage":
                self.channels.add(message["channel"].decode())
            self.scan()

    def scan(self) -> None:
        self.keys.update(k.decode() for k in self.client.scan_iter(count=1000))
        self.channels.update(c.decode() for c in self.client.pubsub_channels())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        self.client.close()


@pytest.fixture
def key_watch(redis_url: str) -> Iterator[KeyWatch]:
    watch = KeyWatch(redis_url)
    yield watch
    watch.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_two_namespaces_share_a_redis_database_without_seeing_each_other(
    env: Env, tmp_path: Path, key_watch: KeyWatch
) -> None:
    tenants_path = tmp_path / "tenants.yaml"
    # A submit rate, so that the rate limiter's bucket is among the keys checked.
    tenants_path.write_text(
        TENANTS_YAML.replace(
            "    env: {TENANT_GREETING: hello-alpha}\n",
            "    env: {TENANT_GREETING: hello-alpha}\n    submit_rate: {per_s: 100, burst: 100}\n",
        )
    )
    envs = {ns: _deployment(env, ns, tenants_path) for ns in NAMESPACES}
    producers: dict[str, Producer] = {}
    started: dict[str, WorkerProc] = {}
    try:
        for ns, deployment in envs.items():
            producers[ns] = deployment.producer()
            started[ns] = start_worker(deployment, "alpha", concurrency=2)
        assert "Redis list blue.alpha" in started["blue"].output()

        # Same tenant, same queue name: each namespace's commands run on its own worker only.
        ids = {
            ns: [
                p.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", ns, str(n)])).id
                for n in range(6)
            ]
            for ns, p in producers.items()
        }
        for ns, p in producers.items():
            pool = set(started[ns].pool_pids())
            for command_id in ids[ns]:
                rec = p.wait(command_id, timeout=30)
                assert (rec.state, rec.stdout) == (
                    State.SUCCEEDED,
                    f"{ns} {ids[ns].index(command_id)}\n",
                )
                ran_by = {t.actor for t in p.get(command_id, with_transitions=True).transitions}
                assert any(
                    a.startswith("alpha@") and int(a.rsplit(":", 1)[1]) in pool for a in ran_by
                ), ran_by
            # A worker of the other namespace would have refused them as unknown commands.
            refused = [e for e in p.audit_events(tenant="alpha") if e.outcome == "refused"]
            assert refused == []

        # A revoke in blue, by command and by Celery remote control, never reaches green.
        sleeping = {
            ns: p.submit(CommandSpec(tenant="alpha", argv=["/bin/sleep", "30"])).id
            for ns, p in producers.items()
        }
        for ns, p in producers.items():
            wait_for(lambda p=p, ns=ns: p.get(sleeping[ns]).state is State.RUNNING, 15, ns)
        blue, green = producers["blue"], producers["green"]
        blue_app = make_celery(envs["blue"].settings, envs["blue"].tenants)
        try:
            # green's id, broadcast in blue: blue's workers do not know it; green's never hear it.
            blue_app.control.revoke(sleeping["green"], terminate=True)
        finally:
            blue_app.close()
        blue.revoke(sleeping["blue"], terminate=True)
        assert blue.wait(sleeping["blue"], timeout=15).state is State.REVOKED
        key_watch.scan()
        assert green.get(sleeping["green"]).state is State.RUNNING
        assert not green.store.cancel_requested(sleeping["green"])
        green.revoke(sleeping["green"], terminate=True)
        assert green.wait(sleeping["green"], timeout=15).state is State.REVOKED
        key_watch.scan()
    finally:
        for p in producers.values():
            p.close()
        for w in started.values():
            w.stop()

    prefixes = tuple(f"{ns}." for ns in NAMESPACES)
    assert key_watch.keys, "no key seen"
    assert {k for k in key_watch.keys if not k.startswith(prefixes)} == set()
    # Channels are server-wide in Redis: those of other databases (another test run, say)
    # are told apart by the database they name, as kombu's (`/<db>.`) and execq's do.
    db = database_of(key_watch.url)
    ours = {c for c in key_watch.channels if f"/{db}." in c or f".cancel.{db}." in c}
    assert {c for c in ours if not c.startswith(prefixes)} == set()
    for ns in NAMESPACES:
        # Each namespace's own keys and channels were there, under its name.
        own = {f"{ns}._kombu.binding.execq", f"{ns}.rate.alpha", f"{ns}.reaper.alpha"}
        assert own <= key_watch.keys, sorted(key_watch.keys)
        assert f"{ns}.cancel.{db}.alpha" in ours
