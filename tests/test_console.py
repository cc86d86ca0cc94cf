"""The operators' console (/ui/): sessions, CSRF and scopes in-process, then a real browser
(the system's Chromium driven by Playwright) against a real gateway and worker."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from producer.client import Producer
from producer.spec import CommandSpec
from producer.states import State
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.store.repository import Store
from producer.tenants import load_tenants
from producer.tokens import Tokens
from tests.conftest import CI, Env, start_gateway, start_worker, wait_for
from workers.gateway import create_app
from workers.gateway.console.session import COOKIE

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


@pytest.fixture
def ui_env(make_env: Callable[..., Env], tmp_path: Path, redis_url: str) -> Env:
    env = make_env(
        f"sqlite:///{tmp_path / 'ui.db'}",
        redis_url,
        EXECQ_TRACE_URL="https://traces.example/trace/{trace_id}",
    )
    env.settings = env.settings.model_copy(update={"trace_url": env.vars["EXECQ_TRACE_URL"]})
    env.tenants = load_tenants(Path(env.vars["EXECQ_TENANTS_FILE"]))
    upgrade(make_engine(env.settings.database_url))
    return env


UI = tuple[TestClient, Producer, Tokens]


@pytest.fixture
def ui(ui_env: Env) -> Iterator[UI]:
    producer = ui_env.producer()
    tokens = Tokens(producer.store, trail=producer.trail)
    with TestClient(create_app(producer, tokens=tokens), follow_redirects=False) as client:
        yield client, producer, tokens
    producer.close()


def token(tokens: Tokens, tenant: str = "alpha", scopes: str = "read,operate", **kw: str) -> str:
    _, raw = tokens.create(tenant=tenant, scopes=scopes.split(","), **kw)  # type: ignore[arg-type]
    return raw


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def sign_in(client: TestClient, raw: str) -> str:
    """Sign in through the form; the session's CSRF value."""
    page = client.get("/ui/login")
    answer = client.post(
        "/ui/login", data={"csrf": csrf_of(page.text), "token": raw, "next": "/ui/commands"}
    )
    assert answer.status_code == 303, answer.text
    return csrf_of(client.get("/ui/commands").text)


def echo(producer: Producer, tenant: str = "alpha", *argv: str) -> str:
    spec = CommandSpec(tenant=tenant, argv=["/bin/echo", *(argv or ("hi",))])
    return producer.submit(spec).id


def test_nothing_is_usable_without_signing_in(ui: UI) -> None:
    client, producer, _ = ui
    command_id = echo(producer)
    for path in ("/ui/", "/ui/commands", f"/ui/commands/{command_id}", "/ui/audit"):
        answer = client.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/ui/login?next=")
    # A fragment poll is told 401, so the page reloads to the sign-in form.
    rows = client.get("/ui/commands/rows", headers={"X-Console-Fragment": "1"})
    assert rows.status_code == 401
    # A forged cookie is no session.
    client.cookies.set(COOKIE, "eyJ0IjoidG9rXzEifQ.AAAA", path="/ui")
    assert client.get("/ui/commands").status_code == 303


def test_a_bad_token_is_refused_and_a_good_one_signs_in_with_a_strict_cookie(ui: UI) -> None:
    client, _, tokens = ui
    page = client.get("/ui/login")
    assert page.status_code == 200 and 'name="token"' in page.text
    csrf = csrf_of(page.text)
    for bad in ("exq_nope", token(tokens)[:-1] + "x", token(tokens, scopes="submit")):
        answer = client.post("/ui/login", data={"csrf": csrf, "token": bad})
        assert answer.status_code == 401, bad
        assert 'role="alert"' in answer.text
    answer = client.post(
        "/ui/login", data={"csrf": csrf, "token": token(tokens), "next": "https://evil.example/"}
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain http here; behind https it is Secure
    https = client.get("/ui/login", headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in https.headers["set-cookie"]


def test_posts_without_the_session_csrf_token_are_refused(ui: UI) -> None:
    client, producer, tokens = ui
    csrf = sign_in(client, token(tokens))
    command_id = echo(producer)
    for data in ({}, {"csrf": "forged"}):
        answer = client.post(f"/ui/commands/{command_id}/revoke", data=data)
        assert answer.status_code == 403, data
        assert "CSRF" in answer.text
    assert producer.get(command_id).state is State.PENDING
    # The sign-in form is protected too.
    assert client.post("/ui/login", data={"token": token(tokens)}).status_code == 403
    answer = client.post(f"/ui/commands/{command_id}/revoke", data={"csrf": csrf})
    assert answer.status_code == 303
    assert producer.get(command_id).state is State.REVOKED


def test_a_read_only_token_sees_no_actions_and_is_refused_them(ui: UI) -> None:
    client, producer, tokens = ui
    csrf = sign_in(client, token(tokens, scopes="read", name="watcher"))
    command_id = echo(producer)
    page = client.get(f"/ui/commands/{command_id}")
    assert page.status_code == 200
    assert "/revoke" not in page.text and "no <code>operate</code> scope" in page.text
    answer = client.post(f"/ui/commands/{command_id}/revoke", data={"csrf": csrf})
    assert answer.status_code == 403
    assert producer.get(command_id).state is State.PENDING
    assert client.get("/ui/actions/greet").status_code == 403


def test_another_tenants_command_is_not_found(ui: UI) -> None:
    client, producer, tokens = ui
    csrf = sign_in(client, token(tokens))
    theirs = echo(producer, "beta")
    assert client.get(f"/ui/commands/{theirs}").status_code == 404
    assert client.get(f"/ui/commands/{theirs[:8]}").status_code == 404
    assert client.get(f"/ui/commands/{theirs}/events").status_code == 404
    answer = client.post(f"/ui/commands/{theirs}/revoke", data={"csrf": csrf})
    assert answer.status_code == 404
    assert producer.get(theirs).state is State.PENDING
    assert theirs not in client.get("/ui/commands").text


def test_the_list_filters_by_state_action_and_text(ui: UI) -> None:
    client, producer, tokens = ui
    sign_in(client, token(tokens))
    apple = echo(producer, "alpha", "apple")
    pear = echo(producer, "alpha", "pear")
    greet = producer.submit(CommandSpec(tenant="alpha", action="greet", params={"name": "bob"})).id
    producer.revoke(pear, operator="someone")
    page = client.get("/ui/commands").text
    assert apple in page and pear in page and greet in page
    by_text = client.get("/ui/commands/rows", params={"q": "APPLE"}).text
    assert apple in by_text and pear not in by_text
    by_state = client.get("/ui/commands", params={"state": "revoked"}).text
    assert pear in by_state and apple not in by_state
    by_action = client.get("/ui/commands", params={"action": "greet", "since": "1h"}).text
    assert greet in by_action and apple not in by_action


def test_revoking_names_the_token_in_the_audit_trail(ui: UI) -> None:
    client, producer, tokens = ui
    csrf = sign_in(client, token(tokens, name="night-shift"))
    command_id = echo(producer)
    answer = client.post(
        f"/ui/commands/{command_id}/revoke", data={"csrf": csrf, "reason": "wrong host"}
    )
    assert answer.headers["location"] == f"/ui/commands/{command_id}?done=revoke"
    events = [e for e in producer.audit_events(command_id=command_id) if e.phase == "revoke"]
    assert events and events[-1].operator == "night-shift"
    page = client.get(f"/ui/commands/{command_id}").text
    assert "night-shift" in page and "wrong host" in page
    # An action the state does not allow is refused, and the page says why.
    again = client.post(f"/ui/commands/{command_id}/rollback", data={"csrf": csrf})
    assert again.status_code == 409 and 'role="alert"' in again.text
    retried = client.post(f"/ui/commands/{command_id}/retry", data={"csrf": csrf})
    assert retried.status_code == 303
    rec = producer.get(command_id)
    assert rec.state is State.PENDING and rec.attempts == 2
    retries = [e for e in producer.audit_events(command_id=command_id) if e.phase == "retry"]
    assert retries and retries[-1].operator == "night-shift"


def test_running_an_action_from_its_form(ui: UI) -> None:
    client, producer, tokens = ui
    csrf = sign_in(client, token(tokens, scopes="read,operate,submit", name="ops"))
    form = client.get("/ui/actions/greet")
    assert form.status_code == 200 and 'name="p.name"' in form.text
    bad = client.post("/ui/actions/greet", data={"csrf": csrf, "p.name": "BOB!", "p.count": "2"})
    assert bad.status_code == 422 and 'role="alert"' in bad.text
    good = client.post("/ui/actions/greet", data={"csrf": csrf, "p.name": "bob", "p.count": "2"})
    assert good.status_code == 303, good.text
    command_id = good.headers["location"].split("/")[-1].split("?")[0]
    rec = producer.get(command_id)
    assert rec.action == "greet" and rec.principal == "ops" and rec.argv[-1] == "2"


def test_signing_out_ends_the_session_and_so_does_revoking_the_token(ui: UI) -> None:
    client, _, tokens = ui
    csrf = sign_in(client, token(tokens))
    assert client.post("/ui/logout", data={"csrf": csrf}).status_code == 303
    assert client.get("/ui/commands").status_code == 303
    info, raw = tokens.create(tenant="alpha", scopes=["read"])
    sign_in(client, raw)
    tokens.revoke(info.id)
    assert client.get("/ui/commands").status_code == 303


def test_overview_and_audit_pages_render(ui: UI) -> None:
    client, producer, tokens = ui
    sign_in(client, token(tokens))
    command_id = echo(producer)
    producer.revoke(command_id, operator="x")
    overview = client.get("/ui/", params={"hours": 1})
    assert overview.status_code == 200 and "<svg" in overview.text
    audit = client.get("/ui/audit")
    assert audit.status_code == 200 and "Intact" in audit.text and command_id in audit.text


def test_the_console_is_not_in_the_openapi_document(ui: UI) -> None:
    client, _, _ = ui
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/ui")]


# --- the store's queries behind it, on SQLite and PostgreSQL --------------------------------


def test_the_store_lists_by_action_and_argv_text_and_reads_activity(store: Store) -> None:
    def make(*argv: str, action: str | None = None) -> str:
        spec = CommandSpec(tenant="alpha", argv=argv)
        cid = store.create(spec, actor="t").id
        if action is not None:
            with store.engine.begin() as conn:
                conn.execute(
                    sa.text("UPDATE commands SET action = :a WHERE id = :i"),
                    {"a": action, "i": cid},
                )
        return cid

    plain = make("/bin/echo", "Nightly_Backup 100%")
    other = make("/bin/echo", "NightlyXBackup 1000", action="greet")
    # Case does not matter; LIKE's wildcards are literal ("_" and "%" match only themselves).
    assert [r.id for r in store.list(tenant="alpha", text="nightly_backup")] == [plain]
    assert [r.id for r in store.list(tenant="alpha", text="100%")] == [plain]
    assert len(store.list(tenant="alpha", text="backup")) == 2
    assert [r.id for r in store.list(tenant="alpha", action="greet")] == [other]
    since = datetime.now(UTC) - timedelta(minutes=5)
    assert store.activity("alpha", since) == []
    now = datetime.now(UTC)
    store.transition(
        plain,
        expect_state=State.PENDING,
        expect_version=1,
        to=State.RUNNING,
        actor="w",
        started_at=now,
    )
    store.transition(
        plain,
        expect_state=State.RUNNING,
        expect_version=2,
        to=State.SUCCEEDED,
        actor="w",
        finished_at=now + timedelta(seconds=3),
    )
    store.transition(
        other,
        expect_state=State.PENDING,
        expect_version=1,
        to=State.REVOKED,
        actor="op",
        finished_at=now,
    )
    rows = {r.state: r for r in store.activity("alpha", since)}
    assert set(rows) == {State.SUCCEEDED, State.REVOKED}
    assert rows[State.REVOKED].duration_s is None  # it never ran
    assert rows[State.SUCCEEDED].duration_s == pytest.approx(3, abs=0.01)
    assert store.activity("beta", since) == []
    assert store.activity("alpha", now + timedelta(minutes=1)) == []


# --- in a real browser ----------------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[object]:
    """Headless Chromium from the system's package (Playwright downloads no browser here)."""
    if not Path(CHROMIUM).exists():
        if CI:
            pytest.fail(f"CI needs Chromium at {CHROMIUM} (.ci/run installs it)")
        pytest.skip("no system Chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


SLOW = (
    "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; "
    'do echo "line $i"; sleep 0.5; done'
)


@pytest.mark.slow
def test_in_a_browser_sign_in_filter_follow_and_revoke(
    ui_env: Env, browser: object, tmp_path: Path
) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    producer = ui_env.producer()
    tokens = Tokens(producer.store, trail=producer.trail)
    raw = token(tokens, scopes="read,operate,submit", name="on-call")
    worker = start_worker(ui_env, "alpha", concurrency=2)
    gateway = start_gateway(ui_env)
    try:
        # Some history for the overview: one success, one failure.
        done = [
            producer.submit(CommandSpec(tenant="alpha", argv=argv)).id
            for argv in (["/bin/echo", "nightly backup done"], ["/bin/false"])
        ]
        running = producer.submit(
            CommandSpec(tenant="alpha", argv=["/bin/sh", "-c", SLOW], timeout_s=20)
        ).id
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.set_default_timeout(15_000)

        page.goto(f"{gateway.url}/ui/commands")
        expect(page).to_have_url(re.compile(r"/ui/login\?next="))
        page.get_by_label("Token").fill("exq_" + "x" * 49)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_contain_text("not valid")
        page.get_by_label("Token").fill(raw)
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(re.compile(r"/ui/commands$"))
        expect(page.get_by_test_id("token-name")).to_have_text("on-call")

        page.get_by_label("Command line contains").fill("line $i")
        page.get_by_role("button", name="Filter").click()
        rows = page.locator("#rows tr")
        expect(rows).to_have_count(1)
        expect(rows.first).to_contain_text(running)
        page.screenshot(path=str(tmp_path / "commands.png"))

        rows.first.get_by_role("link").click()
        expect(page.locator("#stdout")).to_contain_text("line 2")
        expect(page.locator("#state")).to_contain_text("running")
        page.screenshot(path=str(tmp_path / "command.png"))

        page.get_by_role("checkbox", name=re.compile("terminate")).check()
        page.get_by_label("Reason").first.fill("stuck deploy")
        page.get_by_role("button", name="Revoke").click()
        expect(page.get_by_role("status")).to_contain_text("revoke")
        wait_for(lambda: producer.get(running).state is State.REVOKED, 15, "the revoked command")
        expect(page.locator("#state")).to_contain_text("revoked", timeout=15_000)
        revokes = [e for e in producer.audit_events(command_id=running) if e.phase == "revoke"]
        assert revokes and revokes[0].operator == "on-call"
        assert revokes[0].reason == "stuck deploy"

        for command_id in done:
            producer.wait(command_id, timeout=15)
        page.goto(f"{gateway.url}/ui/?hours=1")
        expect(page.locator("svg.chart").first).to_be_visible()
        page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
        page.goto(f"{gateway.url}/ui/audit")
        expect(page.locator(".verify")).to_contain_text("Intact")
        page.screenshot(path=str(tmp_path / "audit.png"))
        page.goto(f"{gateway.url}/ui/commands")
        page.screenshot(path=str(tmp_path / "commands.png"))
        page.goto(f"{gateway.url}/ui/commands/{running}")
        page.screenshot(path=str(tmp_path / "command.png"), full_page=True)
        if os.environ.get("UPDATE_SCREENSHOTS"):
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            for name in ("overview", "commands", "command", "audit"):
                shutil.copy(tmp_path / f"{name}.png", SCREENSHOTS / f"{name}.png")
    finally:
        gateway.stop()
        worker.stop()
        producer.close()
