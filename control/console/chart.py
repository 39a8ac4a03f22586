"""The overview's per-minute bar charts, drawn on the server as plain SVG geometry.

No chart library and no script: the template writes one ``<rect>`` per (minute, outcome),
coloured by a CSS class (the page's CSP allows no inline style), with a ``<title>`` for the
hover text. Outcomes are stacked in a fixed order so a colour keeps its meaning across
minutes and refreshes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

# The event log's outcomes, by the kind of entry that carries them (hrflow_webhooks.event_log).
DELIVERY_OUTCOMES = ("queued", "coalesced", "duplicate")
RUN_OUTCOMES = ("done", "retry", "skipped", "unrouted", "dead_lettered")

WIDTH = 600
HEIGHT = 120
GAP = 1  # between two minutes' bars, so neighbours stay apart at any width


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    outcome: str
    title: str


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    bars: tuple[Bar, ...]
    totals: tuple[tuple[str, int], ...]  # per outcome over the whole chart, in stack order
    peak: int  # the tallest minute: the y axis' top
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def empty(self) -> bool:
        return self.peak == 0


def _minute_label(start_s: float) -> str:
    return datetime.fromtimestamp(start_s, UTC).strftime("%H:%M")


def _stack(
    x: float,
    width: float,
    scale: float,
    start_s: float,
    counts: Mapping[str, int],
    order: Sequence[str],
) -> list[Bar]:
    bars, top = [], float(HEIGHT)
    for outcome in order:
        count = counts.get(outcome, 0)
        if count:
            height = count * scale
            top -= height
            title = f"{_minute_label(start_s)} UTC: {count} {outcome}"
            bars.append(Bar(x, top, width, height, outcome, title))
    return bars


def stacked_chart(
    title: str, minutes: Sequence[tuple[float, Mapping[str, int]]], order: Sequence[str]
) -> Chart:
    """One bar per minute, oldest on the left, each stacking ``order``'s outcomes."""
    peak = max((sum(c.get(o, 0) for o in order) for _, c in minutes), default=0)
    scale = HEIGHT / peak if peak else 0.0
    slot = WIDTH / max(len(minutes), 1)
    bars: list[Bar] = []
    for n, (start_s, counts) in enumerate(minutes):
        bars += _stack(n * slot, max(slot - GAP, 1.0), scale, start_s, counts, order)
    totals = tuple((o, sum(c.get(o, 0) for _, c in minutes)) for o in order)
    return Chart(title, tuple(bars), totals, peak)
