"""Head+tail capture: bounded memory, exact totals, and the marker where bytes were dropped."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from workers.sandbox.capture import HeadTail


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
