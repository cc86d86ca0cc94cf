"""The HTTP gateway in-process (FastAPI's TestClient): the contract's answers, bad input,
tenancy, scopes, rate limits and tracing, against the real store and Redis."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from producer.client import Producer
from producer.states import State
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.tenants import load_tenants
from producer.tokens import Tokens
from tests.conftest import TENANTS_YAML, Env
from workers.gateway import create_app

GAMMA = """
  gamma:
    concurrency: 1
    executables: [/bin/echo]
    limits: {timeout_s: 5, cpu_s: 5, memory_mb: 128, processes: 16, output_kb: 16, file_mb: 4}
    require_idempotency_key: true
    http_rate: {per_s: 0.5, burst: 3}
"""


@pytest.fixture
def gw_env(make_env: Callable[..., Env], tmp_path: Path, redis_url: str) -> Env:
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS_YAML + GAMMA)
    env = make_env(f"sqlite:///{tmp_path / 'gw.db'}", redis_url, EXECQ_TENANTS_FILE=str(path))
    env.tenants = load_tenants(path)
    upgrade(make_engine(env.settings.database_url))
    return env


Gateway = tuple[TestClient, Producer, Tokens]


@pytest.fixture
def gw(gw_env: Env) -> Iterator[Gateway]:
    producer = gw_env.producer()
    tokens = Tokens(producer.store, trail=producer.trail)
    with TestClient(create_app(producer, tokens=tokens, max_body=4096)) as client:
        yield client, producer, tokens
    producer.close()


def bearer(
    tokens: Tokens,
    tenant: str = "alpha",
    scopes: str = "submit,read,operate",
    name: str | None = None,
) -> dict[str, str]:
    _, raw = tokens.create(tenant=tenant, scopes=scopes.split(","), name=name)
    return {"Authorization": f"Bearer {raw}"}


ECHO = {"argv": ["/bin/echo", "hi"]}


def test_health_needs_no_token_and_everything_else_does(gw: Gateway) -> None:
    client, _, tokens = gw
    assert client.get("/healthz").json() == {"status": "ok"}
    for method, path in [
        ("get", "/v1/commands"),
        ("post", "/v1/commands"),
        ("get", "/v1/actions"),
        ("get", "/v1/commands/0123456789abcdef"),
    ]:
        answer = client.request(method, path, json=ECHO)
        assert answer.status_code == 401, (method, path, answer.text)
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        assert "error" in answer.json()
    # The token is checked before the body is read: a malformed body without one is a 401.
    answer = client.post("/v1/commands", content=b"{oops", headers={"Content-Type": "text/x"})
    assert answer.status_code == 401, answer.text
    good = bearer(tokens)["Authorization"]
    flipped = good[:-1] + ("A" if good[-1] != "A" else "B")
    for header in [f"Bearer {flipped}", "Bearer exq_nope", "Basic dXNlcjpwYXNz", good[7:]]:
        answer = client.get("/v1/commands", headers={"Authorization": header})
        assert answer.status_code == 401, header


def test_submit_replay_conflict_and_location(gw: Gateway) -> None:
    client, producer, tokens = gw
    auth = bearer(tokens, name="web-frontend")
    first = client.post("/v1/commands", json=ECHO, headers={**auth, "Idempotency-Key": '"o-42"'})
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["duplicate"] is False and body["state"] == "pending"
    assert first.headers["Location"] == f"/v1/commands/{body['id']}"
    again = client.post("/v1/commands", json=ECHO, headers={**auth, "Idempotency-Key": "o-42"})
    assert again.status_code == 200
    assert again.json() == {"id": body["id"], "state": "pending", "duplicate": True}
    other = client.post(
        "/v1/commands",
        json={"argv": ["/bin/echo", "bye"]},
        headers={**auth, "Idempotency-Key": "o-42"},
    )
    assert other.status_code == 422
    assert other.json()["command_id"] == body["id"]
    rec = producer.get(body["id"])
    # The token's name is the principal: in the record and in every audit event.
    assert rec.principal == "web-frontend" and rec.idempotency_key == "o-42"
    events = producer.audit_events(command_id=body["id"])
    assert events and {e.principal for e in events} == {"web-frontend"}
    assert producer.store.count() == 1


def test_missing_key_where_required_is_400_and_recorded(gw: Gateway) -> None:
    client, producer, tokens = gw
    auth = bearer(tokens, tenant="gamma")
    answer = client.post("/v1/commands", json=ECHO, headers=auth)
    assert answer.status_code == 400
    assert "Idempotency-Key" in answer.json()["error"]
    assert producer.get(answer.json()["command_id"]).state is State.REJECTED
    ok = client.post("/v1/commands", json=ECHO, headers={**auth, "Idempotency-Key": "k1"})
    assert ok.status_code == 201


def test_policy_refusal_is_403_recorded_and_audited(gw: Gateway) -> None:
    client, producer, tokens = gw
    answer = client.post(
        "/v1/commands", json={"argv": ["/bin/rm", "-rf", "/"]}, headers=bearer(tokens)
    )
    assert answer.status_code == 403
    body = answer.json()
    assert body["rule"] and body["command_id"] and "error" in body
    assert producer.get(body["command_id"]).state is State.REJECTED
    phases = [e.phase for e in producer.audit_events(command_id=body["command_id"])]
    assert "abort" in phases


@pytest.mark.parametrize(
    ("payload", "content_type", "status", "names"),
    [
        (b"{not json", "application/json", 400, "JSON"),
        (b"\xff\xfe{}", "application/json", 400, "JSON"),
        (b"[1, 2]", "application/json", 422, ""),
        (b'{"argv": "/bin/echo hi"}', "application/json", 422, "argv"),
        (b'{"argv": ["/bin/echo"], "timeout_s": "10"}', "application/json", 422, "timeout_s"),
        (b'{"argv": ["/bin/echo"], "shell": true}', "application/json", 422, "shell"),
        (b'{"argv": ["echo", "relative"]}', "application/json", 422, "argv"),
        (b'{"argv": ["/bin/echo"], "action": "greet"}', "application/json", 422, ""),
        (b'{"argv": ["/bin/echo", "a\\u0000b"]}', "application/json", 422, "argv"),
        (b"argv=/bin/echo", "application/x-www-form-urlencoded", 415, "JSON"),
        (b"", "application/json", 400, "JSON"),
    ],
)
def test_bad_bodies_get_a_clear_4xx_and_write_nothing(
    gw: Gateway, payload: bytes, content_type: str, status: int, names: str
) -> None:
    client, producer, tokens = gw
    answer = client.post(
        "/v1/commands", content=payload, headers={**bearer(tokens), "Content-Type": content_type}
    )
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert names in body["error"]
    assert "Traceback" not in answer.text and 'File "' not in answer.text
    assert producer.store.count() == 0


def test_huge_bodies_and_header_tricks(gw: Gateway) -> None:
    client, producer, tokens = gw
    auth = bearer(tokens)
    big = json.dumps({"argv": ["/bin/echo", "x" * 5000]})
    answer = client.post(
        "/v1/commands", content=big, headers={**auth, "Content-Type": "application/json"}
    )
    assert answer.status_code == 413 and answer.json()["max_bytes"] == 4096

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        for _ in range(10):
            yield b" " * 1000

    answer = client.post(
        "/v1/commands", content=chunks(), headers={**auth, "Content-Type": "application/json"}
    )
    assert answer.status_code == 413
    for key in ["a b", "x" * 300, "é", '"unterminated']:
        answer = client.post(
            "/v1/commands",
            json=ECHO,
            headers={**auth, "Idempotency-Key": key.encode()},
        )
        assert answer.status_code == 400, key
    answer = client.get("/v1/commands/not-an-id!", headers=auth)
    assert answer.status_code in (404, 422)
    answer = client.get("/v1/commands?limit=100000", headers=auth)
    assert answer.status_code == 422 and "limit" in answer.json()["error"]
    answer = client.get("/v1/commands?cursor=garbage", headers=auth)
    assert answer.status_code == 400
    assert producer.store.count() == 0


def test_another_tenants_command_is_404_and_lists_stay_apart(gw: Gateway) -> None:
    client, _, tokens = gw
    alpha, beta = bearer(tokens, "alpha"), bearer(tokens, "beta")
    ids = [client.post("/v1/commands", json=ECHO, headers=alpha).json()["id"] for _ in range(5)]
    theirs = client.post("/v1/commands", json=ECHO, headers=beta).json()["id"]
    assert client.get(f"/v1/commands/{theirs}", headers=alpha).status_code == 404
    assert client.get(f"/v1/commands/{ids[0]}", headers=beta).status_code == 404
    assert client.post(f"/v1/commands/{ids[0]}/revoke", headers=beta).status_code == 404
    # A prefix of 8+ characters works among the tenant's own commands only.
    assert client.get(f"/v1/commands/{theirs[:8]}", headers=alpha).status_code == 404
    assert client.get(f"/v1/commands/{theirs[:8]}", headers=beta).json()["id"] == theirs
    got = client.get(f"/v1/commands/{ids[0]}", headers=alpha).json()
    assert got["id"] == ids[0] and got["tenant"] == "alpha" and got["transitions"]
    seen: list[str] = []
    cursor = None
    while True:
        query = "/v1/commands?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(query, headers=alpha).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    pending = client.get("/v1/commands?state=pending", headers=beta).json()["items"]
    assert [item["id"] for item in pending] == [theirs]


def test_scopes(gw: Gateway) -> None:
    client, _, tokens = gw
    reader = bearer(tokens, scopes="read")
    submitter = bearer(tokens, scopes="submit")
    answer = client.post("/v1/commands", json=ECHO, headers=reader)
    assert answer.status_code == 403 and "submit" in answer.json()["error"]
    made = client.post("/v1/commands", json=ECHO, headers=submitter).json()["id"]
    assert client.get(f"/v1/commands/{made}", headers=submitter).status_code == 403
    assert client.get(f"/v1/commands/{made}", headers=reader).status_code == 200
    answer = client.post(f"/v1/commands/{made}/revoke", headers=reader)
    assert answer.status_code == 403 and "operate" in answer.json()["error"]
    assert client.get("/v1/actions", headers=submitter).status_code == 200


def test_operate_revoke_retry_rollback(gw: Gateway) -> None:
    client, producer, tokens = gw
    auth = bearer(tokens, name="ops-bot")
    made = client.post("/v1/commands", json=ECHO, headers=auth).json()["id"]
    answer = client.post(f"/v1/commands/{made}/revoke", json={"terminate": True}, headers=auth)
    assert answer.status_code == 200 and answer.json()["state"] == "revoked"
    assert client.post(f"/v1/commands/{made}/revoke", headers=auth).status_code == 409
    assert client.post(f"/v1/commands/{made}/rollback", headers=auth).status_code == 409
    answer = client.post(f"/v1/commands/{made}/retry", headers=auth)
    assert answer.status_code == 200 and answer.json()["state"] == "pending"
    operators = {
        e.principal
        for e in producer.audit_events(command_id=made)
        if e.phase in ("revoke", "retry")
    }
    assert operators == {"ops-bot"}, producer.audit_events(command_id=made)


def test_actions_over_http(gw: Gateway) -> None:
    client, producer, tokens = gw
    auth = bearer(tokens)
    listed = client.get("/v1/actions", headers=auth).json()
    greet = next(a for a in listed["actions"] if a["name"] == "greet")
    assert listed["tenant"] == "alpha"
    assert greet["params"]["properties"]["count"]["maximum"] == 5
    made = client.post(
        "/v1/commands",
        json={"action": "greet", "params": {"name": "bob", "count": 2}},
        headers=auth,
    )
    assert made.status_code == 201, made.text
    rec = producer.get(made.json()["id"])
    assert rec.action == "greet" and rec.argv == ["/bin/echo", "hello bob", "2"]
    refused = client.post(
        "/v1/commands",
        json={"action": "greet", "params": {"name": "bob", "count": 9}},
        headers=auth,
    )
    assert refused.status_code == 403 and "count" in refused.json()["rule"]


def test_rate_limit_answers_429_with_retry_after(gw: Gateway) -> None:
    client, _, tokens = gw
    auth = bearer(tokens, tenant="gamma", scopes="read")
    answers = [client.get("/v1/commands", headers=auth) for _ in range(5)]
    codes = [a.status_code for a in answers]
    assert codes[:3] == [200, 200, 200] and 429 in codes[3:], codes
    limited = next(a for a in answers if a.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert "http_rate" in limited.json()["error"]
    # Another tenant's bucket is its own.
    assert client.get("/v1/commands", headers=bearer(tokens)).status_code == 200


def test_traceparent_continues_into_the_command(gw: Gateway) -> None:
    client, producer, tokens = gw
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    answer = client.post(
        "/v1/commands",
        json=ECHO,
        headers={**bearer(tokens), "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    assert producer.get(answer.json()["id"]).trace_id == trace_id


def test_unexpected_errors_are_json_without_a_trace(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, producer, tokens = gw
    auth = bearer(tokens)

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("s3cr3t value in a message")

    monkeypatch.setattr(producer, "list", broken)
    with TestClient(client.app, raise_server_exceptions=False) as fresh:
        answer = fresh.get("/v1/commands", headers=auth)
    assert answer.status_code == 500
    assert "error" in answer.json()
    assert "s3cr3t" not in answer.text and "Traceback" not in answer.text


def test_openapi_documents_every_route(gw: Gateway) -> None:
    client, _, _ = gw
    spec = client.get("/openapi.json").json()
    assert {
        "/v1/commands",
        "/v1/commands/{command_id}",
        "/v1/commands/{command_id}/events",
        "/v1/commands/{command_id}/revoke",
        "/v1/actions",
        "/healthz",
    } <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_a_revoke_reaches_the_gateway_within_its_token_cache(gw_env: Env) -> None:
    producer = gw_env.producer()
    tokens = Tokens(producer.store)
    info, raw = tokens.create(tenant="alpha", scopes=["read"])
    auth = {"Authorization": f"Bearer {raw}"}
    cached = create_app(producer, tokens=tokens, token_cache_s=60)
    uncached = create_app(producer, tokens=tokens)
    with TestClient(cached) as slow, TestClient(uncached) as fast:
        assert slow.get("/v1/commands", headers=auth).status_code == 200
        assert fast.get("/v1/commands", headers=auth).status_code == 200
        tokens.revoke(info.id)
        # Without a cache the revoke holds at once; with one, once the entry is older.
        assert fast.get("/v1/commands", headers=auth).status_code == 401
        assert slow.get("/v1/commands", headers=auth).status_code == 200
    producer.close()
