"""Wire decoding under hostile input: every decoder raises MessageError and nothing else,
whatever the bytes. The examples are the crashes found by fuzzing; the hypothesis tests
generate structured and raw inputs on top (`make fuzz` runs atheris for longer)."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.ipc.messages import (
    MAX_ELEMENTS,
    VERSION,
    Encoder,
    FrameTemplate,
    MessageError,
    decode,
    decode_plan,
    decode_state,
    pack_array,
    unpack_array,
)


def _plan(w: np.ndarray, **extra: object) -> bytes:
    body = {"waypoints": pack_array(w), "dt_s": 0.1, "t_obs_ns": 123, "latency_ms": 5.0}
    body.update(extra)
    return Encoder().encode("plan", body)


def _state(q: np.ndarray, **extra: object) -> bytes:
    body = {"q": pack_array(q), "dq": pack_array(-q), "t_read_ns": 5, **extra}
    return Encoder().encode("state", body)


def test_plan_round_trip_is_zero_copy_and_exact() -> None:
    w = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    msg, got = decode_plan(_plan(w))
    assert msg["v"] == VERSION and msg["type"] == "plan" and msg["seq"] == 1
    np.testing.assert_array_equal(got, w)
    assert not got.flags.writeable  # a view on the received bytes, not a copy


def test_state_round_trip() -> None:
    q = np.arange(6.0)
    msg, q2, dq2 = decode_state(_state(q), 6)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(dq2, -q)
    assert msg["t_read_ns"] == 5


def test_sequence_numbers_increase() -> None:
    enc = Encoder()
    seqs = [decode(enc.encode("telemetry", {}))["seq"] for _ in range(3)]
    assert seqs == [1, 2, 3]


def _raw(**msg: object) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        (b"\xc1garbage", "malformed"),
        (msgpack.packb([1, 2, 3]), "malformed"),
        (b"\x91" * 5000 + b"\xc0", "malformed"),  # nested deeper than the unpacker's stack
        (_raw(v=99, type="plan", seq=1, t_ns=1), "version"),
        (_raw(v=True, type="plan", seq=1, t_ns=1), "version"),  # True == 1 in Python
        (_raw(v=VERSION, type="bogus", seq=1, t_ns=1), "type"),
        # the 21-byte map that killed the follower: an unhashable type
        (_raw(v=1, type=[], seq=1, t_ns=1), "type"),
        (_raw(v=1, type={"a": 1}, seq=1, t_ns=1), "type"),
        (_raw(v=VERSION, type="plan", seq="x", t_ns=1), "schema"),
        (_raw(v=VERSION, type="plan", seq=1, t_ns=-5), "schema"),
        (_raw(v=VERSION, type="plan", seq=1, t_ns=True), "schema"),
        (_raw(v=VERSION, type="plan", seq=1, t_ns=2**64 - 1), "schema"),
    ],
)
def test_bad_envelopes_are_rejected(frame: bytes, kind: str) -> None:
    with pytest.raises(MessageError) as err:
        decode_plan(frame)
    assert err.value.kind == kind


def test_the_21_byte_control_crash_is_a_message_error() -> None:
    frame = _raw(v=1, type=[], seq=1, t_ns=1)
    assert len(frame) == 21
    with pytest.raises(MessageError):
        decode(frame, "request")


@pytest.mark.parametrize(
    ("shape", "data_len"),
    [
        ([True, 6], 24),  # a bool is not a dimension
        ([2**32, 2**32], 0),  # int64-overflowing product
        ([2**31, 2**31, 0], 0),  # numpy's reshape raised on this one
        ([2**20, 2**20, 0], 0),  # zero-size but 2**40 nested lists in .tolist()
        ([1] * 5, 4),  # rank above the cap
        ([-1, 6], 24),
        ([MAX_ELEMENTS + 1], 4 * (MAX_ELEMENTS + 1)),
        ("6", 24),
        ([6.0], 24),
    ],
)
def test_hostile_array_shapes_are_rejected(shape: object, data_len: int) -> None:
    with pytest.raises(MessageError):
        unpack_array({"dtype": "<f4", "shape": shape, "data": b"\0" * data_len}, "x")


def test_array_whose_bytes_do_not_fill_its_shape_is_rejected() -> None:
    bad = {"dtype": "<f4", "shape": [10, 6], "data": b"\x00" * 12}
    frame = Encoder().encode("plan", {"waypoints": bad, "dt_s": 0.1, "t_obs_ns": 1})
    with pytest.raises(MessageError) as err:
        decode_plan(frame)
    assert err.value.kind == "shape"


@pytest.mark.parametrize("dtype", ["|O", "<c16", ["<f4"], None, "|b1"])
def test_disallowed_dtypes_are_rejected(dtype: object) -> None:
    with pytest.raises(MessageError):
        unpack_array({"dtype": dtype, "shape": [1], "data": b"\x00" * 8}, "x")


def test_plan_with_nan_is_rejected() -> None:
    w = np.zeros((10, 6), dtype=np.float32)
    w[3, 2] = np.nan
    with pytest.raises(MessageError) as err:
        decode_plan(_plan(w))
    assert err.value.kind == "nonfinite"


@pytest.mark.parametrize("dt", [float("nan"), float("inf"), "0.1", None, True])
def test_plan_dt_must_be_a_finite_number(dt: object) -> None:
    with pytest.raises(MessageError):
        decode_plan(_plan(np.zeros((10, 6), np.float32), dt_s=dt))


@pytest.mark.parametrize("t_read", ["x", None, -1, 2**64 - 1, 1.5, True])
def test_state_with_a_bad_read_time_is_rejected(t_read: object) -> None:
    """A bad t_read_ns used to kill the planner."""
    with pytest.raises(MessageError):
        decode_state(_state(np.zeros(6), t_read_ns=t_read), 6)


def test_frame_template_fills_in_place_and_decodes() -> None:
    like = np.zeros(6)
    tpl = FrameTemplate("state", ("t_read_ns",), {"q": like, "dq": like}, {"mode": "HOLD"})
    buf_id = id(tpl.buf)
    tpl.arrays["q"][:] = np.arange(6.0)
    tpl.arrays["dq"][:] = -1.5
    tpl.set_int("t_read_ns", 12345)
    frame = bytes(tpl.stamp(777))
    msg, q, dq = decode_state(frame, 6)
    np.testing.assert_array_equal(q, np.arange(6.0))
    np.testing.assert_array_equal(dq, -1.5)
    assert (msg["seq"], msg["t_ns"], msg["t_read_ns"], msg["mode"]) == (1, 777, 12345, "HOLD")
    assert decode(bytes(tpl.stamp(778)))["seq"] == 2 and id(tpl.buf) == buf_id


# ------------------------------------------------------------------ fuzzing
_int = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
_leaf = (st.none() | st.booleans() | _int | st.floats() | st.text(max_size=8)
         | st.binary(max_size=64))
_value = st.recursive(_leaf, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=20)
_shape = st.lists(st.integers(min_value=-2, max_value=2**40) | st.booleans(), max_size=6)

_array = st.fixed_dictionaries({"dtype": st.sampled_from(["<f4", "<f8", "|u1", "<i8", "|O", 3]),
                                 "shape": _shape | _value, "data": st.binary(max_size=96)})
_field = _array | _value


def _messages() -> st.SearchStrategy[bytes]:
    envelope = st.fixed_dictionaries(
        {"v": st.sampled_from([1, 1, 1, True, 2, "1"]),
         "type": st.sampled_from(["plan", "state", "request", "reply", "x"]) | _value,
         "seq": _int | _value, "t_ns": _int | _value},
        optional={"waypoints": _field, "q": _field, "dq": _field, "dt_s": _field,
                  "t_obs_ns": _field, "t_read_ns": _field, "cmd": _value, "args": _value})
    return envelope.map(lambda m: msgpack.packb(m, use_bin_type=True))


def _all_decoders(frame: bytes) -> None:
    for fn in (lambda f: decode(f), lambda f: decode(f, "request"), decode_plan,
               lambda f: decode_state(f, 6)):
        try:
            fn(frame)
        except MessageError:
            pass


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(_messages())
def test_fuzz_structured_messages_raise_only_message_error(frame: bytes) -> None:
    _all_decoders(frame)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256))
def test_fuzz_raw_bytes_raise_only_message_error(frame: bytes) -> None:
    _all_decoders(frame)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_array)
def test_fuzz_arrays_never_exceed_the_element_cap(obj: dict[str, object]) -> None:
    try:
        a = unpack_array(obj, "x")
    except MessageError:
        return
    assert a.size <= MAX_ELEMENTS
    assert math.prod(d or 1 for d in a.shape) <= MAX_ELEMENTS
    a.tolist()  # what the recorder does with it: bounded
