"""The loop stage (autoregressive action tokens over a fixed-size KV buffer): detokenizers
(uniform bins, FAST), a tiny PyTorch autoregressive planner exported and decoded by the
runtime token for token as its source decodes it, and the same bundle live on the stack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from byo_policies import (
    AR_BINS,
    AR_BINS_DETOKENIZER,
    AR_DELTA,
    AR_END,
    AR_H,
    AR_TOKENS,
    ar_bundle,
    ar_contract,
    ar_greedy,
)
from sim_arm import JOINTS, N_JOINTS
from stack import Stack

from runtime.model.bundle import load_bundle
from runtime.model.contract import BinsDetokenizer, Contract, FastDetokenizer
from runtime.model.detokenizer import BinsCodec, DetokenizeError, FastCodec, train_fast_bpe
from runtime.planner.latency import synthetic_observation
from runtime.planner.pipeline import PlannerPipeline

SCALE = 100.0


def _smooth_chunks(n: int, seed: int = 0) -> np.ndarray:
    """Chunks [n, H, D] like a policy's: smooth in time, within +-AR_DELTA."""
    rng = np.random.default_rng(seed)
    start, slope = rng.uniform(-0.03, 0.03, (2, n, 1, N_JOINTS))
    t = np.linspace(0, 1, AR_H)[None, :, None]
    return np.clip(start + slope * t * 0.5, -AR_DELTA, AR_DELTA)


@pytest.fixture(scope="module")
def fast_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("fast") / "fast.json"
    return path, train_fast_bpe(_smooth_chunks(400), SCALE, AR_BINS, path)


def _fast_spec(min_symbol: int) -> dict[str, Any]:
    return {"kind": "fast", "tokenizer": "fast.json", "scale": SCALE, "min_symbol": min_symbol}


def test_bins_round_trip_within_half_a_bin_and_a_short_sequence_holds() -> None:
    codec = BinsCodec(BinsDetokenizer.model_validate(AR_BINS_DETOKENIZER))
    chunk = _smooth_chunks(1)[0]
    tokens = np.array(codec.encode(chunk))
    assert tokens.shape == (AR_TOKENS,) and tokens.min() >= 0 and tokens.max() < AR_BINS
    out = np.zeros((AR_H, N_JOINTS))
    codec.decode(tokens, out)
    assert np.abs(out - chunk).max() <= AR_DELTA / AR_BINS + 1e-12  # half of a 2 x delta bin
    codec.decode(tokens[:N_JOINTS + 2], out)  # one step and a bit: the step held
    assert np.array_equal(out[1:], np.repeat(out[:1], AR_H - 1, axis=0))
    with pytest.raises(DetokenizeError, match="not one step"):
        codec.decode(tokens[:N_JOINTS - 1], out)


def test_fast_round_trip_within_the_dct_rounding(fast_tokenizer: tuple[Path, int]) -> None:
    path, low = fast_tokenizer
    codec = FastCodec(FastDetokenizer.model_validate(_fast_spec(low)), path, AR_H)
    out = np.zeros((AR_H, N_JOINTS))
    for chunk in _smooth_chunks(20, seed=1):
        tokens = np.array(codec.encode(chunk))
        assert len(tokens) < AR_TOKENS  # BPE merges: fewer tokens than values
        codec.decode(tokens, out)
        # orthonormal DCT: each coefficient is off by at most 0.5 / scale
        assert np.abs(out - chunk).max() <= 0.5 * np.sqrt(AR_H) / SCALE
    # cut short (the end token came early): the highest frequencies are missing, zero
    codec.decode(np.array(codec.encode(chunk))[:-1], out)
    assert np.abs(out - chunk).max() < 0.01


def test_a_loop_stage_must_be_last_and_carry_what_its_source_gives() -> None:
    contract = ar_contract(AR_BINS_DETOKENIZER)
    bad = yaml.safe_load(yaml.safe_dump(contract))
    bad["planner"]["stages"][1]["inputs"][0]["source"] = "prefill.nothing"
    with pytest.raises(ValueError, match=r"starts from prefill\.nothing"):
        Contract.model_validate(bad)
    bad = yaml.safe_load(yaml.safe_dump(contract))
    bad["planner"]["stages"][1]["outputs"][1]["shape"] = [1, 2, 2, 7, 16]
    with pytest.raises(ValueError, match=r"starts from prefill\.kv0"):
        Contract.model_validate(bad)
    bad = yaml.safe_load(yaml.safe_dump(contract))
    bad["planner"]["stages"][1]["loop"]["detokenizer"]["low"] = [0.0]
    with pytest.raises(ValueError, match="low has 1 entries for 6 joints"):
        Contract.model_validate(bad)
    bad = yaml.safe_load(yaml.safe_dump(contract))
    del bad["planner"]["stages"][1]["loop"]
    with pytest.raises(ValueError, match="carry/position/token need `loop:`"):
        Contract.model_validate(bad)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bins", "fast"])
def test_the_loop_stage_decodes_as_its_pytorch_source(kind: str, tmp_path: Path,
                                                      fast_tokenizer: tuple[Path, int],
                                                      sim_config: Any) -> None:
    """Token for token what the PyTorch model's own greedy loop gives, stopped on its end
    token; the chunk is those tokens detokenized, relative to the observed q; each step
    timed in planner.stage_ms."""
    detok = AR_BINS_DETOKENIZER
    if kind == "fast":
        src = tmp_path / "b.src"
        src.mkdir()
        (src / "fast.json").write_bytes(fast_tokenizer[0].read_bytes())
        detok = _fast_spec(fast_tokenizer[1])
    bundle = load_bundle(ar_bundle(tmp_path / "b", detok), None, JOINTS)
    pipe = PlannerPipeline.configured(bundle, sim_config)
    loop = pipe.stages[-1].loop
    assert loop is not None
    for seed in range(3):
        obs = synthetic_observation(sim_config)
        q = obs.history.at("q", obs.t_obs_ns) + np.random.default_rng(seed).uniform(
            -0.3, 0.3, N_JOINTS)
        obs.history.add(obs.t_obs_ns, q=q, dq=np.zeros(N_JOINTS))
        waypoints = pipe.plan(obs).copy()
        expected = ar_greedy(q)
        assert len(expected) == AR_TOKENS and AR_END not in expected
        got = loop.tokens[0, :loop.lengths[0]].tolist()
        assert got == expected
        chunk = np.zeros((AR_H, N_JOINTS))
        loop.codec.decode(np.array(expected), chunk)
        np.testing.assert_allclose(waypoints, q + chunk, atol=1e-6)
    ms = pipe.stage_ms()
    assert ms["decode.steps"]["p50"] == AR_TOKENS + 1  # stopped on END, not max_steps
    assert 0 < ms["decode.step"]["p50"] < ms["decode"]["p50"]


@pytest.mark.system
def test_an_autoregressive_bundle_drives_the_live_stack(tmp_path: Path) -> None:
    bundle = ar_bundle(tmp_path / "ar")
    with Stack(tmp_path, bundle, ["planner.task_source=operator",
                                  "planner.instruction=touch the red block"]) as stack:
        stack.wait_mode("TRACK", 30)
        assert stack.telemetry()["safety"]["faults"] == 0
