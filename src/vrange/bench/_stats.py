"""The statistics core of ``python -m vrange bench``: interleaved repeats of a (measured, baseline)
pair, and the median and spread of their per-repeat ratios.

A ratio is measured / baseline, both costs (time), so lower is faster. Each repeat runs the pair back
to back, in alternating order (measured first on even repeats, baseline first on odd ones), so a
machine that drifts (another job starting, a CPU clocking down) moves both sides alike and cancels
out of the ratio. Rules for trusting a row are here, in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: A row whose p90/p10 ratio spread exceeds this is flagged "wide": too noisy to trust.
WIDE_SPREAD = 1.25
#: Fewer repeats than this give no spread worth the name: the row is flagged "few".
MIN_TRUSTED_REPEATS = 5

SPREAD_RULE = (f"wide: p90/p10 of the per-repeat ratios > {WIDE_SPREAD}; few: fewer than "
               f"{MIN_TRUSTED_REPEATS} repeats")


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` (0..1) quantile of ``values``, interpolating linearly between the two
    nearest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within 0..1, not {fraction}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    """Median and spread of a row's per-repeat ratios."""

    median: float
    p10: float
    p90: float
    count: int

    @property
    def spread(self) -> float:
        """p90 / p10 (1.0 when every repeat agrees)."""
        return self.p90 / self.p10 if self.p10 > 0 else math.inf

    @property
    def wide(self) -> bool:
        return self.spread > WIDE_SPREAD

    @property
    def few(self) -> bool:
        return self.count < MIN_TRUSTED_REPEATS

    @property
    def note(self) -> str:
        """Why the row should not be trusted, or "" when it can be."""
        notes = []
        if self.wide:
            notes.append(f"wide (p90/p10 {self.spread:.2f} > {WIDE_SPREAD})")
        if self.few:
            notes.append(f"few ({self.count} < {MIN_TRUSTED_REPEATS} repeats)")
        return ", ".join(notes)

    def as_dict(self) -> dict[str, object]:
        return {"median": self.median, "p10": self.p10, "p90": self.p90, "count": self.count,
                "spread": self.spread, "wide": self.wide, "few": self.few}


def summarize(values: Sequence[float]) -> Summary:
    return Summary(percentile(values, 0.5), percentile(values, 0.1), percentile(values, 0.9),
                   len(values))


@dataclass(frozen=True)
class Sample:
    """One repeat: both costs, and which ran first."""

    measured: float
    baseline: float
    measured_first: bool

    @property
    def ratio(self) -> float:
        return self.measured / self.baseline if self.baseline > 0 else math.inf


def compare(measure: Callable[[], float], baseline: Callable[[], float], repeats: int,
            after_each: Callable[[int], None] | None = None, warm_up: bool = True) -> list[Sample]:
    """Run ``measure`` and ``baseline`` ``repeats`` times, interleaved in alternating order, after
    one untimed run of each (``warm_up``: first-use costs such as faulting in a copy's target
    buffer or starting a backend's threads belong to neither side)."""
    if warm_up:
        measure()
        baseline()
    samples = []
    for index in range(repeats):
        if index % 2 == 0:
            measured = measure()
            base = baseline()
        else:
            base = baseline()
            measured = measure()
        samples.append(Sample(measured, base, index % 2 == 0))
        if after_each is not None:
            after_each(index + 1)
    return samples
