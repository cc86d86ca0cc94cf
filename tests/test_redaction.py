"""The redactor removes a command's secret values and their encodings, and nothing else."""

from __future__ import annotations

import base64
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st

from producer.redaction import Redactor

CANARY = "canary-Zx9!q/7+w=s3cr3t"


def test_exact_values_are_replaced_by_their_name() -> None:
    text, changed = Redactor({"API_TOKEN": CANARY}).scrub(f"token={CANARY}\nagain {CANARY}")
    assert changed and text == "token=[secret:API_TOKEN]\nagain [secret:API_TOKEN]"


def test_url_encoded_and_base64_forms_are_replaced_at_any_alignment() -> None:
    r = Redactor({"T": CANARY})
    for prefix in (b"", b"x", b"xy", b"xyz"):
        blob = base64.b64encode(prefix + CANARY.encode() + b"tail").decode()
        text, changed = r.scrub(f"Authorization: Basic {blob}")
        assert changed, prefix
        assert base64.b64encode(CANARY.encode()).decode()[2:12] not in (text or "")
    text, changed = r.scrub(f"https://h/?t={quote(CANARY, safe='')}")
    assert changed and "[secret:T]" in (text or "")


def test_text_without_secrets_is_untouched() -> None:
    text = "version 1.2.3, 42 files, base64 aGVsbG8gd29ybGQ="
    assert Redactor({"T": CANARY}).scrub(text) == (text, False)
    assert Redactor({}).scrub(text) == (text, False)
    assert Redactor({"T": CANARY}).scrub(None) == (None, False)


@settings(max_examples=200, deadline=None)
@given(
    secret=st.text(min_size=6, max_size=40), before=st.text(max_size=30), after=st.text(max_size=30)
)
def test_a_secret_never_survives_scrubbing(secret: str, before: str, after: str) -> None:
    text, _ = Redactor({"S": secret}).scrub(before + secret + after)
    assert secret not in (text or "")


def test_a_secret_that_looks_like_the_mark_is_still_removed() -> None:
    for value in ("secret", "[secret:S]", "redacted"):
        text, changed = Redactor({"S": value}).scrub(f"x {value} y")
        assert changed and value not in (text or "")
