"""Secret values are sealed in messages: Redis never holds one in clear text."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import redis

from producer.client import Producer
from producer.sealing import Sealer, Unsealable, key_dir, local_key, sealer_from_env
from producer.settings import ConfigInvalid, Settings
from producer.spec import CommandSpec
from producer.states import State
from tests.conftest import Env
from workers.pipeline import BadMessage, decode

MASTER = b"m" * 32
CID = "0b3d6a4e-8f0a-4c55-9d3e-1c2b3a4d5e6f"
OTHER = "5c1f1a52-2f3e-4d0b-8b0e-7a6b5c4d3e2f"


def test_a_sealed_value_opens_only_for_its_command_and_tenant() -> None:
    sealer = Sealer(MASTER)
    sealed = sealer.seal(CID, "alpha", {"TOKEN": "tok-1", "B": "é"})
    assert "tok-1" not in sealed and sealed.startswith("v1.")
    assert sealer.open(CID, "alpha", sealed) == {"TOKEN": "tok-1", "B": "é"}
    for cid, tenant in ((OTHER, "alpha"), (CID, "beta")):
        with pytest.raises(Unsealable):
            sealer.open(cid, tenant, sealed)
    altered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(Unsealable):
        sealer.open(CID, "alpha", altered)
    with pytest.raises(Unsealable):
        Sealer(b"n" * 32).open(CID, "alpha", sealed)


def test_a_workers_sealer_holds_its_own_tenants_key_only() -> None:
    sealed_for_alpha = Sealer(MASTER).seal(CID, "alpha", {"T": "a"})
    sealed_for_beta = Sealer(MASTER).seal(CID, "beta", {"T": "b"})
    beta = Sealer(MASTER).for_tenant("beta")
    assert beta.open(CID, "beta", sealed_for_beta) == {"T": "b"}
    with pytest.raises(Unsealable, match="no key for tenant 'alpha'"):
        beta.open(CID, "alpha", sealed_for_alpha)
    with pytest.raises(ValueError, match="no master key"):
        beta.for_tenant("alpha")


def test_without_a_configured_key_a_private_local_key_file_is_made_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EXECQ_SECRETS_KEY", raising=False)
    monkeypatch.delenv("EXECQ_SECRETS_KEY_FILE", raising=False)
    settings = Settings(database_url=f"sqlite:///{tmp_path}/store/execq.db")
    assert key_dir(settings) == tmp_path / "store" / "keys"
    first = sealer_from_env(settings).seal(CID, "alpha", {"T": "v"})
    path = tmp_path / "store" / "keys" / "secrets.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(path.read_bytes().strip()) == 64
    # Another process (producer or worker) finds the same key.
    assert sealer_from_env(settings).open(CID, "alpha", first) == {"T": "v"}
    assert local_key(path.parent) == path.read_bytes().strip()


def test_a_configured_key_is_used_and_a_short_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path}/execq.db")
    monkeypatch.setenv("EXECQ_SECRETS_KEY", "k" * 32)
    sealed = sealer_from_env(settings).seal(CID, "alpha", {"T": "v"})
    assert Sealer(b"k" * 32).open(CID, "alpha", sealed) == {"T": "v"}
    assert not (tmp_path / "keys").exists()
    monkeypatch.setenv("EXECQ_SECRETS_KEY", "short")
    with pytest.raises(ConfigInvalid, match="EXECQ_SECRETS_KEY: the key has 5 bytes"):
        sealer_from_env(settings)


def test_a_worker_refuses_clear_text_secrets_and_ones_it_cannot_open() -> None:
    worker = Sealer(MASTER).for_tenant("alpha")
    with pytest.raises(BadMessage, match="clear text"):
        decode(CID, {"command_id": CID, "tenant": "alpha", "secrets": {"T": "x"}}, {}, worker)
    moved = Sealer(MASTER).seal(OTHER, "alpha", {"T": "x"})
    with pytest.raises(BadMessage, match="do not open"):
        decode(CID, {"command_id": CID, "tenant": "alpha", "sealed": moved}, {}, worker)
    ok = Sealer(MASTER).seal(CID, "alpha", {"T": "x"})
    delivery = decode(CID, {"command_id": CID, "tenant": "alpha", "sealed": ok}, {}, worker)
    assert delivery.secrets == {"T": "x"}


def _everything_in(client: redis.Redis) -> bytes:
    dump = b""
    for key in client.scan_iter():
        kind = client.type(key)
        if kind == b"list":
            dump += b"".join(client.lrange(key, 0, -1))
        elif kind == b"string":
            dump += client.get(key) or b""
        elif kind == b"hash":
            dump += b"".join(k + v for k, v in client.hgetall(key).items())
        elif kind == b"zset":
            dump += b"".join(m for m, _ in client.zrange(key, 0, -1, withscores=True))
        elif kind == b"set":
            dump += b"".join(client.smembers(key))
    return dump


def test_no_secret_value_sits_in_redis_while_its_command_waits(
    producer: Producer, env: Env
) -> None:
    canary = "sealed-canary-7f3e9a"
    r = producer.submit(
        CommandSpec(tenant="alpha", argv=["/bin/echo", "x"], secrets={"TOKEN": canary})
    )
    assert producer.flush(5) == 0
    client = redis.Redis.from_url(env.settings.broker_url)
    dump = _everything_in(client)
    client.close()
    assert r.id.encode() in dump  # the message is there...
    assert canary.encode() not in dump  # ...and the secret is not, in any plain form
    import base64

    assert base64.b64encode(canary.encode())[:12] not in dump
    assert producer.get(r.id).state is State.PENDING
    assert os.environ.get("EXECQ_SECRETS_KEY") is None
