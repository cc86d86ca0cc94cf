"""The overview's charts as SVG drawn on the server: no script, readable by a screen reader
through their title and the table beside them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from markupsafe import Markup, escape

from producer.states import State
from producer.store.reads import Finished

# The final states the charts tell apart, in stacking order.
FINAL = (State.SUCCEEDED, State.FAILED, State.REVOKED, State.REVERTED, State.REVERT_FAILED)
WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 720, 200, 48, 22, 8


@dataclass
class Bucket:
    """The commands that finished in one slice of the window."""

    start: datetime
    counts: dict[State, int] = field(default_factory=dict)
    durations: list[float] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentile(self, p: float) -> float | None:
        """The nearest-rank percentile of the run times (None: nothing ran)."""
        if not self.durations:
            return None
        ordered = sorted(self.durations)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def bucketed(rows: Sequence[Finished], since: datetime, until: datetime, n: int) -> list[Bucket]:
    """`n` equal slices of [since, until), each with what finished in it."""
    step = (until - since) / n
    buckets = [Bucket(since + step * i) for i in range(n)]
    for row in rows:
        i = int((row.finished_at - since) / step)
        if 0 <= i < n:
            b = buckets[i]
            b.counts[row.state] = b.counts.get(row.state, 0) + 1
            if row.duration_s is not None:
                b.durations.append(row.duration_s)
    return buckets


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 5, 10):
        if value <= m * power:
            return float(m * power)
    return float(10 * power)


def _frame(title: str, top: float, unit: str, first: datetime, step: timedelta, n: int) -> str:
    plot_w, plot_h = WIDTH - LEFT, HEIGHT - BOTTOM - TOP
    parts = [
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH}" y2="{TOP + plot_h}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/>',
        f'<text class="tick" x="{LEFT - 4}" y="{TOP + 8}" text-anchor="end">{top:g}</text>',
        f'<text class="tick" x="{LEFT - 4}" y="{TOP + plot_h}" text-anchor="end">0</text>',
        f'<text class="tick" x="4" y="{TOP + plot_h / 2}">{escape(unit)}</text>',
    ]
    for i in range(0, n + 1, max(1, n // 6)):
        x = LEFT + plot_w * i / n
        label = (first + step * i).strftime("%H:%M")
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{HEIGHT - 6}" text-anchor="middle">{label}</text>'
        )
    return "".join(parts)


def rate_chart(buckets: Sequence[Bucket], step: timedelta, title: str) -> Markup:
    """Stacked bars: commands per minute in each slice, by final state."""
    n = len(buckets)
    minutes = step.total_seconds() / 60
    top = _nice_max(max((b.total / minutes for b in buckets), default=0))
    plot_w, plot_h = WIDTH - LEFT, HEIGHT - BOTTOM - TOP
    bar_w = plot_w / n
    bars = []
    for i, b in enumerate(buckets):
        y = float(TOP + plot_h)
        for state in FINAL:
            count = b.counts.get(state, 0)
            if not count:
                continue
            h = plot_h * (count / minutes) / top
            y -= h
            bars.append(
                f'<rect class="s-{state.value}" x="{LEFT + i * bar_w + 0.5:.1f}" y="{y:.1f}" '
                f'width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}">'
                f"<title>{b.start:%H:%M}: {count} {state.value}</title></rect>"
            )
    first = buckets[0].start if buckets else datetime.now()
    return _svg(title, _frame(title, top, "/min", first, step, n) + "".join(bars))


def duration_chart(buckets: Sequence[Bucket], step: timedelta, title: str) -> Markup:
    """Two lines: the p50 and p95 run time in each slice (gaps where nothing ran)."""
    n = len(buckets)
    p50 = [b.percentile(50) for b in buckets]
    p95 = [b.percentile(95) for b in buckets]
    top = _nice_max(max((v for v in p95 if v is not None), default=0))
    plot_w, plot_h = WIDTH - LEFT, HEIGHT - BOTTOM - TOP
    lines = []
    for name, values in (("p50", p50), ("p95", p95)):
        points = [
            f"{LEFT + plot_w * (i + 0.5) / n:.1f},{TOP + plot_h - plot_h * v / top:.1f}"
            for i, v in enumerate(values)
            if v is not None
        ]
        if points:
            lines.append(f'<polyline class="line-{name}" points="{" ".join(points)}"/>')
            for point in points:
                x, y = point.split(",")
                lines.append(f'<circle class="dot-{name}" cx="{x}" cy="{y}" r="2"/>')
    first = buckets[0].start if buckets else datetime.now()
    return _svg(title, _frame(title, top, "s", first, step, n) + "".join(lines))


def _svg(title: str, body: str) -> Markup:
    return Markup(  # noqa: S704 - every interpolated value is a number or escaped
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}">{body}</svg>'
    )
