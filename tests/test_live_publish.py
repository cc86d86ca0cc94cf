"""Live output, the worker's side: what reaches the stream is scrubbed, whole, capped, and
never holds the command up."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from producer.redaction import Redactor
from producer.settings import Settings
from workers import live
from workers.live import LiveOutput, _Stream, cut_marker
from workers.sandbox import ExecRequest, Limits, Sandbox

SECRET = 'tok"en/é-7f3e9b1d'  # a quote, a slash and a non-ASCII letter
FORMS = (SECRET, json.dumps(SECRET)[1:-1], quote(SECRET, safe=""))
REDACTOR = Redactor({"TOKEN": SECRET})


def taken(chunks: list[bytes], redactor: Redactor = REDACTOR, *, wait_s: float = 0) -> str:
    """What a stream publishes when each chunk is flushed on its own, then the end."""
    stream = _Stream("stdout")
    now, out = 0.0, []
    for chunk in chunks:
        stream.held += chunk
        out.append(stream.take(redactor, now, last=False, cut=False))
        now += wait_s
    out.append(stream.take(redactor, now, last=True, cut=False))
    return "".join(out)


@pytest.mark.parametrize("form", FORMS)
def test_a_secret_split_at_any_byte_between_flushes_never_goes_out(form: str) -> None:
    data = f"before {form} after\n".encode()
    start = data.index(form.encode())
    for at in range(start, start + len(form.encode()) + 1):
        text = taken([data[:at], data[at:]])
        assert text == "before [secret:TOKEN] after\n", (at, text)


def test_a_secret_written_byte_by_byte_never_goes_out() -> None:
    data = f"x{SECRET}y{SECRET}\n".encode()
    text = taken([data[i : i + 1] for i in range(len(data))])
    assert text == "x[secret:TOKEN]y[secret:TOKEN]\n"


@given(
    st.lists(st.sampled_from([*FORMS, "tok", "en/", "a", " ", "\n", "é"]), max_size=30),
    st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_however_output_is_split_what_goes_out_is_the_scrubbed_whole(
    pieces: list[str], cuts: list[int]
) -> None:
    data = "".join(pieces).encode()
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    text = taken(chunks)
    assert text == REDACTOR.scrub(data.decode())[0]
    assert not any(form in text for form in FORMS)


def test_bytes_that_cannot_begin_a_secret_are_not_held_back() -> None:
    stream = _Stream("stdout")
    stream.held += b"progress 10%\n"
    assert stream.take(REDACTOR, 0.0, last=False, cut=False) == "progress 10%\n"
    stream.held += b"tok"  # could be the secret's start: it waits for more
    assert stream.take(REDACTOR, 0.0, last=False, cut=False) == ""
    stream.held += b"yo\n"
    assert stream.take(REDACTOR, 0.0, last=False, cut=False) == "tokyo\n"


def test_a_character_split_between_flushes_arrives_whole() -> None:
    data = "日本語 ok\n".encode()
    for at in range(1, len(data)):
        assert taken([data[:at], data[at:]], Redactor()) == "日本語 ok\n"


def test_a_partial_line_waits_for_its_end_then_goes_out_after_a_while() -> None:
    stream = _Stream("stdout")
    stream.held += b"mail alice@exam"
    assert stream.take(Redactor(), 0.0, last=False, cut=False) == ""
    stream.held += b"ple.com\nnext"
    # The whole line is masked as the stored output is; the new partial line waits.
    assert stream.take(Redactor(), 0.1, last=False, cut=False) == "mail ali***@***example.com\n"
    assert stream.take(Redactor(), 0.1 + live.LINE_HOLD_S, last=False, cut=False) == "next"


# --- through Redis -----------------------------------------------------------------------------


@pytest.fixture
def output(redis_url: str) -> Iterator[LiveOutput]:
    out = LiveOutput(redis_url, Settings(broker_url=redis_url))
    yield out
    out.close()


def published(redis_url: str, key: str) -> list[tuple[str, str]]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return [(f["stream"], f["text"]) for _, f in client.xrange(key)]
    finally:
        client.close()


def test_each_stream_stops_at_its_cap_with_one_marker(output: LiveOutput, redis_url: str) -> None:
    with output.publishing("capped", Redactor(), 1000) as tap:
        for _ in range(30):
            tap.feed("stdout", b"o" * 99 + b"\n")
            tap.feed("stderr", b"e" * 99 + b"\n")
    entries = published(redis_url, tap.key)
    for name in ("stdout", "stderr"):
        text = "".join(t for s, t in entries if s == name)
        assert text.endswith(cut_marker(1000)) and text.count("…[live output stops") == 1
        assert len(text) - len(cut_marker(1000)) <= 1000
    client = redis.Redis.from_url(redis_url)
    assert 0 < client.ttl(tap.key) <= live.TTL_S
    client.close()


def test_a_secret_cut_by_the_cap_leaves_none_of_its_bytes(
    output: LiveOutput, redis_url: str
) -> None:
    data = b"x" * 90 + SECRET.encode()
    with output.publishing("cap-secret", REDACTOR, 100) as tap:
        tap.feed("stdout", data)
    text = "".join(t for _, t in published(redis_url, tap.key))
    assert text == "x" * 90 + cut_marker(100)


def test_a_command_run_in_the_sandbox_publishes_while_it_runs(
    output: LiveOutput, redis_url: str, tmp_path: Path
) -> None:
    limits = Limits(timeout_s=10, cpu_s=10, memory_mb=256, processes=16, output_kb=64, file_mb=1)
    script = "echo first; sleep 0.5; echo second >&2"
    req = ExecRequest("live-run", ("/bin/sh", "-c", script), ("/bin/sh",), limits)
    with (
        Sandbox(workdir_root=tmp_path / "runs") as sandbox,
        output.publishing("live-run", Redactor(), 64 * 1024) as tap,
    ):
        started = time.monotonic()
        sandbox.run(req)
    entries = published(redis_url, tap.key)
    assert entries == [("stdout", "first\n"), ("stderr", "second\n")]
    assert time.monotonic() - started < 2


def test_without_redis_live_output_is_dropped_and_the_command_never_waits(
    redis_url: str,
) -> None:
    down = LiveOutput("redis://127.0.0.1:1/0", Settings(broker_url=redis_url))
    started = time.monotonic()
    for n in range(3):
        with down.publishing(f"lost-{n}", Redactor(), 1000) as tap:
            for _ in range(100):
                tap.feed("stdout", b"line\n")
    assert time.monotonic() - started < 3 * live.CLOSE_WAIT_S + 0.5
    down.close()
