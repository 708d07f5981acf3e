"""The figures the summaries and telemetry report: preallocated sample rings (a recent
window, exact) and log-bucketed histograms (a whole run, fixed size), and the percentile
summaries made of either.

A process that runs for weeks keeps its per-tick figures in a `Histogram`: its memory is
fixed at construction (a few KB), so RSS after a day is RSS after a minute. A `Ring` keeps
the last N raw samples for windows ("the last second") where exact values matter. A `Series`
is both: one store per sample on the hot path, folded into its histogram in batches.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable

import numpy as np

DEFAULT_KEYS = ("p50", "p99", "max")


class Ring:
    """Fixed-capacity float ring; `add` never allocates."""

    def __init__(self, capacity: int) -> None:
        self._store = array("d", bytes(8 * capacity))  # item stores: a third of numpy's cost
        self.buf = np.frombuffer(self._store)  # the same memory, for the summaries
        self.capacity = capacity
        self.count = 0  # total samples ever added

    def add(self, value: float) -> None:
        self._store[self.count % self.capacity] = value
        self.count += 1

    def values(self, last: int | None = None) -> np.ndarray:
        n = min(self.count, self.buf.shape[0])
        if last is not None:
            n = min(n, last)
        if n == 0:
            return self.buf[:0]
        end = self.count % self.buf.shape[0]
        if end >= n:
            return self.buf[end - n:end]
        return np.concatenate((self.buf[self.buf.shape[0] - (n - end):], self.buf[:end]))


class Histogram:
    """Counts of non-negative values in logarithmic buckets, each `RATIO` wide, between
    `lowest` and `highest`; a value is reported as its bucket's geometric middle, so a
    percentile is within sqrt(RATIO) - 1 < 1 % of the exact one (HDR-histogram style).

    Below `lowest` (and negatives) count in one bucket reported as the exact minimum; above
    `highest` in one reported as the exact maximum. The counts are 64-bit: at 1 kHz they
    overflow after 584 million years. `add` touches no new memory.
    """

    RATIO = 1.02

    def __init__(self, lowest: float = 0.1, highest: float = 1e8) -> None:
        self.lowest = lowest
        self._scale = 1.0 / math.log(self.RATIO)
        self._offset = math.log(lowest) * self._scale - 1.0  # bucket 0: below `lowest`
        self.buckets = math.ceil(math.log(highest / lowest) * self._scale) + 2
        self.counts = array("Q", bytes(8 * self.buckets))
        self.count = 0
        self.total = 0.0  # sum of all values added
        self.min = math.inf
        self.max = -math.inf

    def add(self, value: float) -> None:
        if value >= self.lowest:
            i = int(math.log(value) * self._scale - self._offset)
            self.counts[i if i < self.buckets else self.buckets - 1] += 1
        else:
            self.counts[0] += 1
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value
        if value < self.min:
            self.min = value

    def add_many(self, values: np.ndarray) -> None:
        """Count a batch (vectorised: `add` for each, at a fraction of the cost)."""
        if values.size == 0:
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.log(np.maximum(values, self.lowest)) * self._scale - self._offset
        index = np.where(values >= self.lowest, scaled, 0.0).astype(np.int64)
        np.clip(index, 0, self.buckets - 1, out=index)
        counts = np.frombuffer(self.counts, dtype=np.uint64)
        counts += np.bincount(index, minlength=self.buckets).astype(np.uint64)
        self.count += int(values.size)
        self.total += float(values.sum())
        self.max = max(self.max, float(values.max()))
        self.min = min(self.min, float(values.min()))

    def merge(self, other: Histogram) -> None:
        """Add `other`'s counts (same buckets: made with the same lowest and highest)."""
        if other.buckets != self.buckets or other.lowest != self.lowest:
            raise ValueError("histograms with different buckets")
        counts = np.frombuffer(self.counts, dtype=np.uint64)
        counts += np.frombuffer(other.counts, dtype=np.uint64)
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        self.min = min(self.min, other.min)

    def percentile(self, q: float) -> float:
        """The q-th percentile (0..100), as numpy's default rank, to within one bucket."""
        if self.count == 0:
            return 0.0
        rank = int(q / 100.0 * (self.count - 1))  # 0-based rank of the sample wanted
        cumulative = np.cumsum(np.frombuffer(self.counts, dtype=np.uint64))
        i = int(np.searchsorted(cumulative, rank, side="right"))
        if i == 0:
            return self.min
        if i == self.buckets - 1:
            return self.max
        middle = math.exp((i + self._offset + 0.5) / self._scale)
        return min(max(middle, self.min), self.max)

    def summary(self, keys: tuple[str, ...] = DEFAULT_KEYS, scale: float = 1.0,
                digits: int = 1) -> dict[str, float]:
        """As `summarize` on the raw samples, to within 1 % ("max" exact)."""
        if self.count == 0:
            return dict.fromkeys(keys, 0.0)
        return {key: round((self.max if key == "max" else self.percentile(_quantile(key)))
                           * scale, digits) for key in keys}

    @property
    def nbytes(self) -> int:
        return self.counts.itemsize * len(self.counts)


class Series(Ring):
    """Per-tick samples: the last `window` raw (a Ring) and every one in a Histogram, folded
    in from the ring in batches (`fold`, off the hot path), so `add` stays one store. The
    owner folds at least every `window` samples (none is lost: `fold` says how many it took).
    `transform` maps a batch before it is counted (e.g. a period to its jitter)."""

    def __init__(self, window: int, hist: Histogram | None = None,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        super().__init__(window)
        self.hist = hist if hist is not None else Histogram()
        self.transform = transform
        self.folded = 0  # samples counted in `hist`

    @property
    def unfolded(self) -> int:
        return self.count - self.folded

    def fold(self) -> int:
        new = min(self.unfolded, self.capacity)
        if new:
            batch = self.values(new)
            self.hist.add_many(self.transform(batch) if self.transform else batch)
        self.folded = self.count
        return new


def _quantile(key: str) -> float:
    """"p50" -> 50, "p99" -> 99, "p999" -> 99.9 (the digits after "p", a point after two)."""
    digits = key[1:]
    return float(digits) / (10 ** (len(digits) - 2)) if key.startswith("p") else 50.0


def summarize(values: np.ndarray, keys: tuple[str, ...] = DEFAULT_KEYS,
              scale: float = 1.0, digits: int = 1) -> dict[str, float]:
    if values.size == 0:
        return dict.fromkeys(keys, 0.0)
    return {key: round(float(values.max() if key == "max"
                             else np.percentile(values, _quantile(key))) * scale, digits)
            for key in keys}
