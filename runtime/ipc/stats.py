"""Preallocated sample rings and the percentile summaries the summary and telemetry use."""

from __future__ import annotations

import numpy as np


class Ring:
    """Fixed-capacity float ring; `add` never allocates."""

    def __init__(self, capacity: int) -> None:
        self.buf = np.zeros(capacity)
        self.count = 0  # total samples ever added

    def add(self, value: float) -> None:
        self.buf[self.count % self.buf.shape[0]] = value
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


def summarize(values: np.ndarray, keys: tuple[str, ...] = ("p50", "p99", "max"),
              scale: float = 1.0, digits: int = 1) -> dict[str, float]:
    if values.size == 0:
        return dict.fromkeys(keys, 0.0)
    out = {}
    for key in keys:
        if key == "max":
            v = float(values.max())
        else:
            q = float(key[1:]) / (10 ** (len(key) - 3)) if key.startswith("p") else 50.0
            v = float(np.percentile(values, q))
        out[key] = round(v * scale, digits)
    return out
