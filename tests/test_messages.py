import msgpack
import numpy as np
import pytest

from runtime.messages import (
    VERSION,
    Encoder,
    MessageError,
    decode,
    decode_plan,
    decode_state,
    pack_array,
)


def _plan(w: np.ndarray, **extra: object) -> bytes:
    body = {"waypoints": pack_array(w), "dt_s": 0.1, "t_obs_ns": 123, "latency_ms": 5.0}
    body.update(extra)
    return Encoder().encode("plan", body)


def test_plan_round_trip_is_zero_copy_and_exact() -> None:
    w = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    msg, got = decode_plan(_plan(w), 6)
    assert msg["v"] == VERSION and msg["type"] == "plan" and msg["seq"] == 1
    np.testing.assert_array_equal(got, w)
    assert not got.flags.writeable  # a view on the received bytes, not a copy


def test_state_round_trip() -> None:
    q, dq = np.arange(6.0), -np.arange(6.0)
    frame = Encoder().encode("state", {"q": pack_array(q), "dq": pack_array(dq)})
    _, q2, dq2 = decode_state(frame, 6)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(dq2, dq)


def test_sequence_numbers_increase() -> None:
    enc = Encoder()
    seqs = [decode(enc.encode("telemetry", {}))["seq"] for _ in range(3)]
    assert seqs == [1, 2, 3]


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        (b"\xc1garbage", "malformed"),
        (msgpack.packb([1, 2, 3]), "malformed"),
        (msgpack.packb({"v": 99, "type": "plan", "seq": 1, "t_ns": 1}), "version"),
        (msgpack.packb({"v": VERSION, "type": "bogus", "seq": 1, "t_ns": 1}), "type"),
        (msgpack.packb({"v": VERSION, "type": "plan", "seq": "x", "t_ns": 1}), "schema"),
    ],
)
def test_bad_envelopes_are_rejected(frame: bytes, kind: str) -> None:
    with pytest.raises(MessageError) as err:
        decode_plan(frame, 6)
    assert err.value.kind == kind


def test_plan_with_nan_is_rejected() -> None:
    w = np.zeros((10, 6), dtype=np.float32)
    w[3, 2] = np.nan
    with pytest.raises(MessageError) as err:
        decode_plan(_plan(w), 6)
    assert err.value.kind == "nonfinite"


def test_plan_with_wrong_shape_is_rejected() -> None:
    with pytest.raises(MessageError) as err:
        decode_plan(_plan(np.zeros((10, 5), dtype=np.float32)), 6)
    assert err.value.kind == "shape"


def test_array_whose_bytes_do_not_fill_its_shape_is_rejected() -> None:
    bad = {"dtype": "<f4", "shape": [10, 6], "data": b"\x00" * 12}
    frame = Encoder().encode("plan", {"waypoints": bad, "dt_s": 0.1, "t_obs_ns": 1})
    with pytest.raises(MessageError) as err:
        decode_plan(frame, 6)
    assert err.value.kind == "shape"


def test_plan_with_bad_dt_is_rejected() -> None:
    with pytest.raises(MessageError):
        decode_plan(_plan(np.zeros((10, 6), np.float32), dt_s=-1.0), 6)


def test_disallowed_dtype_is_rejected() -> None:
    bad = {"dtype": "|O", "shape": [1], "data": b"\x00" * 8}
    frame = Encoder().encode("plan", {"waypoints": bad, "dt_s": 0.1, "t_obs_ns": 1})
    with pytest.raises(MessageError):
        decode_plan(frame, 6)
