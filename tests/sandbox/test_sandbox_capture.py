"""Head+tail capture: bounded memory, exact totals, the marker where bytes were dropped, and
no piece of a secret where the cut falls."""

from __future__ import annotations

import base64
import json
import shlex
from dataclasses import replace
from urllib.parse import quote, quote_plus

from hypothesis import given, settings
from hypothesis import strategies as st

from producer.redaction import Redactor
from tests.sandbox.helpers import python
from workers.sandbox import Sandbox
from workers.sandbox.capture import HeadTail, Scrub, scrubbing


@given(st.lists(st.binary(max_size=300), max_size=40), st.integers(min_value=0, max_value=200))
def test_head_and_tail_are_exactly_the_first_and_last_bytes(chunks: list[bytes], cap: int) -> None:
    buf = HeadTail(cap)
    for c in chunks:
        buf.feed(c)
    data = b"".join(chunks)
    assert buf.total == len(data)
    assert bytes(buf.head) == data[:cap]
    kept = len(data) - len(buf.head)
    tail = data[len(data) - min(cap, kept) :] if cap else b""
    assert buf.kept_tail == tail
    assert buf.omitted == len(data) - len(buf.head) - len(tail)
    assert buf.truncated == (buf.omitted > 0)
    assert len(buf.head) + len(buf.tail) <= 3 * cap


def test_output_within_twice_the_cap_is_returned_whole() -> None:
    buf = HeadTail(4)
    buf.feed(b"abcdefgh")
    assert buf.text() == "abcdefgh" and not buf.truncated


def test_dropped_bytes_are_marked_and_counted() -> None:
    buf = HeadTail(2)
    for c in (b"ab", b"cdef", b"gh"):
        buf.feed(c)
    assert buf.text() == "ab\n…[4 bytes omitted]…\ngh"


def test_a_zero_cap_keeps_nothing_but_counts_everything() -> None:
    buf = HeadTail(0)
    buf.feed(b"x" * 10)
    assert (buf.text(), buf.total, buf.truncated) == ("\n…[10 bytes omitted]…\n", 10, True)


# --- secrets the cut would split ----------------------------------------------------------------

SECRET = 'tok"en/\\é-7f3e9b1d'  # a quote, a slash, a backslash and a non-ASCII letter


def scrubbed(cap: int, secret: str = SECRET) -> HeadTail:
    return HeadTail(cap, Scrub(Redactor({"TOKEN": secret})))


def test_a_secret_straddling_the_cut_is_scrubbed() -> None:
    raw = SECRET.encode()
    for cut in range(1, len(raw)):
        buf = scrubbed(10)
        data = b"a" * (10 - cut) + raw + b"b" * 50 + raw + b"c" * (10 - cut)
        for i in range(0, len(data), 7):
            buf.feed(data[i : i + 7])
        omitted = len(data) - 20
        assert buf.text() == (
            f"{'a' * (10 - cut)}[secret:TOKEN]\n…[{omitted} bytes omitted]…\n"
            f"[secret:TOKEN]{'c' * (10 - cut)}"
        ), cut
        assert (buf.total, buf.omitted, buf.truncated) == (len(data), omitted, True)
        assert buf.scrub is not None and buf.scrub.redacted


def test_a_secret_across_head_and_tail_of_output_kept_whole_is_marked_once() -> None:
    raw = SECRET.encode()
    buf = scrubbed(len(raw))
    buf.feed(b"x" * 5 + raw + b"y" * 5)
    assert buf.text() == "xxxxx[secret:TOKEN]yyyyy" and not buf.truncated


def test_output_without_secrets_is_cut_exactly_as_without_scrubbing() -> None:
    data = "é日".encode() * 40  # cut inside characters on both sides
    for cap in (0, 1, 7, 50, 119, 120, 200):
        plain, buf = HeadTail(cap), scrubbed(cap)
        plain.feed(data)
        buf.feed(data)
        assert buf.text() == plain.text(), cap
        assert (buf.total, buf.omitted, buf.truncated) == (
            plain.total,
            plain.omitted,
            plain.truncated,
        )
        assert buf.scrub is not None and not buf.scrub.redacted


def printed_forms(value: str) -> list[str]:
    """How a command may print `value`: raw, JSON-escaped, shell-quoted, URL-encoded."""
    escaped = json.dumps(value)[1:-1]
    return [
        value,
        escaped,
        escaped.replace("/", "\\/"),
        json.dumps(value, ensure_ascii=False)[1:-1],
        shlex.quote(value),
        value.replace("'", "'\"'\"'"),
        quote(value, safe=""),
        quote_plus(value),
    ]


# Secrets and filler share no character, nor does either with the marks or the forms' escapes.
SECRETS = st.text(alphabet="QWXZ\"'/\\é€", min_size=6, max_size=24)
FILLER = st.text(alphabet=" \n.,;:!?()<>ä日", min_size=1, max_size=300)


@settings(max_examples=300, deadline=None)
@given(
    secret=SECRETS,
    layout=st.lists(st.tuples(FILLER, st.integers(min_value=0, max_value=8)), max_size=8),
    end=FILLER,
    cap=st.integers(min_value=0, max_value=160),
    chunk=st.integers(min_value=1, max_value=500),
)
def test_no_four_bytes_of_a_secret_survive_wherever_the_cut_falls(
    secret: str, layout: list[tuple[str, int]], end: str, cap: int, chunk: int
) -> None:
    forms = printed_forms(secret)
    # The base64 form's core is scrubbed; its last bytes (padding) may stay, as before.
    forms_b64 = [*forms, base64.b64encode(secret.encode()).decode()]
    data = ("".join(filler + forms_b64[i] for filler, i in layout) + end).encode()
    plain, buf = HeadTail(cap), scrubbed(cap, secret)
    for i in range(0, len(data), chunk):
        plain.feed(data[i : i + chunk])
        buf.feed(data[i : i + chunk])
    stored = buf.text().encode()
    pieces = {f[i : i + 4] for f in map(str.encode, forms) for i in range(len(f) - 3)}
    assert not [p for p in pieces if p in stored]
    assert (buf.total, buf.omitted, buf.truncated) == (plain.total, plain.omitted, plain.truncated)
    if not layout:
        assert buf.text() == plain.text()
    assert len(buf.head) + len(buf.tail) <= 3 * (cap + buf.margin)


def test_a_sandbox_run_within_scrubbing_stores_no_piece_of_a_cut_secret(sandbox: Sandbox) -> None:
    code = "import os, sys; t = os.environ['TOKEN']; sys.stdout.write('a' * 1020 + t * 200)"
    req = replace(python(code, output_kb=1), env={"TOKEN": SECRET})
    with scrubbing(Redactor({"TOKEN": SECRET})) as scrub:
        r = sandbox.run(req)
    assert r.stdout_bytes == 1020 + 200 * len(SECRET.encode()) and r.stdout_truncated
    assert scrub.redacted and r.stdout.startswith("a" * 1020 + "[secret:TOKEN]\n…[")
    # The kept 1024 bytes start inside a copy: that copy is marked whole, like the others.
    assert r.stdout.split("…\n")[-1] == "[secret:TOKEN]" * -(-1024 // len(SECRET.encode()))
    assert not any(SECRET.encode()[:i] in r.stdout.encode() for i in range(4, len(SECRET)))
