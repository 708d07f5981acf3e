import numpy as np
import pytest

from runtime.follower.safety import NonFiniteCommand, SafetyFilter

D = 3
DT = 0.002


def _filter() -> SafetyFilter:
    f = SafetyFilter(np.full(D, -1.0), np.full(D, 1.0), np.full(D, 2.0), np.full(D, 50.0), DT)
    f.reset(np.zeros(D))
    return f


def test_position_is_clamped_to_limits() -> None:
    f = _filter()
    f.last[:] = 0.999
    out = np.zeros(D)
    assert f.apply(np.full(D, 1.5), out)
    assert (out <= 1.0).all()
    assert f.clamped == 1


def test_velocity_and_acceleration_are_limited() -> None:
    f = _filter()
    out = np.zeros(D)
    f.apply(np.full(D, 0.5), out)  # a 0.5 rad jump in one tick
    assert np.all(np.abs(out) <= 50.0 * DT * DT + 1e-12)  # accel-limited from rest
    for _ in range(2000):
        f.apply(np.full(D, 0.9), out)
        assert np.all(np.abs(f.last_vel) <= 2.0 + 1e-9)
    np.testing.assert_allclose(out, 0.9, atol=1e-6)


def test_non_finite_command_raises_and_leaves_last_command() -> None:
    f = _filter()
    out = np.zeros(D)
    f.apply(np.full(D, 0.001), out)
    last = f.last.copy()
    with pytest.raises(NonFiniteCommand):
        f.apply(np.array([0.0, np.nan, 0.0]), out)
    np.testing.assert_array_equal(f.last, last)


def test_reset_starts_from_measured_position() -> None:
    f = _filter()
    f.reset(np.array([0.3, -0.2, 5.0]))
    np.testing.assert_allclose(f.last, [0.3, -0.2, 1.0])
    np.testing.assert_array_equal(f.last_vel, 0.0)


@pytest.mark.parametrize(("vmax", "amax"), [(0.0, 50.0), (-2.0, 50.0), (2.0, 0.0),
                                          (2.0, -1.0), (np.inf, 50.0), (2.0, np.nan)])
def test_non_positive_or_non_finite_limits_are_refused(vmax: float, amax: float) -> None:
    """A limit <= 0 used to invert the clip: a joint told to hold was driven to its limit."""
    with pytest.raises(ValueError):
        SafetyFilter(np.full(D, -1.0), np.full(D, 1.0), np.full(D, vmax), np.full(D, amax), DT)
