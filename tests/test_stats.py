"""The figures' containers: a log-bucketed histogram reports numpy's percentiles to within
1 % in memory fixed at construction; the follower's summary is built from them."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from drivers.bus import BusStats
from runtime.follower.core import CoreSettings, FollowerCore
from runtime.follower.figures import LoopFigures
from runtime.ipc.stats import Histogram, Series, summarize
from tests.sim_arm import sim_config


@pytest.mark.parametrize("draw", [
    lambda rng, n: rng.lognormal(np.log(150.0), 0.6, n),  # tick times, µs
    lambda rng, n: rng.exponential(2000.0, n),  # plan delivery, µs
    lambda rng, n: np.abs(rng.normal(0.0, 20.0, n)) + 0.05,  # period jitter near 0
    lambda rng, n: rng.uniform(1.0, 1e6, n),  # six decades
])
def test_percentiles_within_one_percent_of_numpy(draw) -> None:
    rng = np.random.default_rng(7)
    values = draw(rng, 200_000)
    hist = Histogram(lowest=0.01)
    for v in values:
        hist.add(float(v))
    for q in (1, 10, 50, 90, 99, 99.9):
        exact = np.percentile(values, q)
        assert hist.percentile(q) == pytest.approx(exact, rel=0.01), q
    assert hist.max == values.max() and hist.min == values.min()
    assert hist.total == pytest.approx(values.sum())
    keys = ("p50", "p99", "p999", "max")
    for key, got in hist.summary(keys, digits=3).items():
        assert got == pytest.approx(summarize(values, keys, digits=3)[key], rel=0.01), key


def test_out_of_range_values_report_the_exact_extremes() -> None:
    hist = Histogram(lowest=1.0, highest=100.0)
    for v in (0.0, -3.0, 5.0, 6.0, 1e9):
        hist.add(v)
    assert hist.percentile(0) == -3.0 and hist.percentile(100) == 1e9
    assert hist.summary(("p50", "max")) == {"p50": pytest.approx(5.0, rel=0.01), "max": 1e9}
    assert Histogram().summary(("p50", "p99")) == {"p50": 0.0, "p99": 0.0}


def test_memory_is_fixed_at_construction() -> None:
    hist = Histogram()
    size = hist.nbytes
    assert size < 16 * 1024  # a few KB
    rng = np.random.default_rng(1)
    values = rng.lognormal(5.0, 2.0, 100_000).tolist()
    for v in values[:1000]:
        hist.add(v)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for v in values:
        hist.add(v)
    grown = sum(d.size_diff for d in tracemalloc.take_snapshot().compare_to(before, "filename")
                if d.traceback[0].filename.endswith("stats.py"))
    tracemalloc.stop()
    assert hist.nbytes == size and grown < 1024, grown  # a few live floats and ints, not 100k


def test_loop_figures_hold_no_per_tick_history() -> None:
    """A long run's figures take the memory of a short one's: no ring grows with the run."""
    def footprint(figures: LoopFigures) -> int:
        total = 0
        for value in vars(figures).values():
            hist = getattr(value, "hist", value)
            total += getattr(value, "buf", np.zeros(0)).nbytes
            total += hist.nbytes if isinstance(hist, Histogram) else 0
        return total

    figures = LoopFigures(sim_config())
    start = footprint(figures)
    assert start < 1 << 20  # the old rings: 2^21 samples each, 16 MB apiece
    for i in range(50_000):
        figures.logic_us.add(50.0 + i % 11)
        figures.tick(2000.0 + i % 7, 150.0, missed=i % 1000 == 0)
        if i % 3000 == 0:
            figures.fold()  # in the slack, when there is some; else forced in the tick
    assert footprint(figures) == start
    summary = figures.summary(FollowerCore(CoreSettings.from_config(sim_config()), None),
                              BusStats(), {})
    assert figures.periods.hist.count == figures.logic_us.hist.count == 50_000
    assert summary["achieved_hz"] == pytest.approx(1e6 / 2003.0, rel=1e-3)
    assert summary["period_jitter_us"]["max"] == 6.0 and summary["deadline_misses"] == 50
    assert summary["logic_us"]["p50"] == pytest.approx(55.0, rel=0.01)


def test_series_folds_in_batches_what_adding_one_by_one_counts() -> None:
    values = np.random.default_rng(3).lognormal(4.0, 1.0, 10_000)
    series, one_by_one = Series(1024), Histogram()
    for i, v in enumerate(values):
        series.add(float(v))
        one_by_one.add(float(v))
        if i % 1000 == 999:
            assert series.fold() == 1000
    series.fold()
    assert series.hist.counts == one_by_one.counts
    assert series.hist.count == 10_000 and series.hist.max == one_by_one.max
    assert series.values(3).tolist() == values[-3:].tolist()  # the raw window
