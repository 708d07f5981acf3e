"""policy.models: the I/O contract, baked normalisation, checkpoints, ONNX export + parity."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from policy.models import (
    Follower,
    Planner,
    count_parameters,
    example_inputs,
    load_checkpoint,
    save_checkpoint,
)
from runtime.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def planner() -> Planner:
    torch.manual_seed(0)
    return Planner(Tokenizer().vocab_size).eval()


def test_planner_contract_and_size(planner: Planner) -> None:
    image, tokens, q = example_inputs(planner, batch=2)
    q = torch.tensor([[0.1, -0.2, 0.3, 0.0, 0.5, 0.4]] * 2)
    with torch.no_grad():
        out = planner(image, tokens, q)
    assert out.shape == (2, 10, 6) and out.dtype == torch.float32
    assert 2e6 < count_parameters(planner) < 5e6  # "a small transformer, a few million"


def test_planner_predicts_deltas_from_q(planner: Planner) -> None:
    """With a zero head the chunk is q repeated: deltas are added back inside forward."""
    p = Planner(Tokenizer().vocab_size).eval()
    p.load_state_dict(planner.state_dict())
    torch.nn.init.zeros_(p.head.weight)
    torch.nn.init.zeros_(p.head.bias)
    image, tokens, _ = example_inputs(p)
    q = torch.tensor([[0.3, -0.4, 1.0, 0.2, -0.1, 0.6]])
    with torch.no_grad():
        assert torch.allclose(p(image, tokens, q), q[:, None, :].expand(1, 10, 6))


def test_planner_uses_every_input() -> None:
    torch.manual_seed(0)
    planner = Planner(Tokenizer().vocab_size).eval()
    with torch.no_grad():  # sharp heatmaps, as after training (at init they are ~uniform)
        planner.vision.heatmaps.weight.mul_(100.0)
    _, _, q = example_inputs(planner)
    # coloured squares in different places: each colour heatmap peaks somewhere else, so
    # which colour the instruction names moves the target
    image = torch.full((1, 96, 96, 3), 200, dtype=torch.uint8)
    for i, rgb in enumerate([(230, 20, 15), (12, 180, 30), (20, 55, 240), (250, 215, 12)]):
        image[0, 20 + 15 * i:26 + 15 * i, 10 + 20 * i:16 + 20 * i] = torch.tensor(rgb)
    tok = Tokenizer()
    with torch.no_grad():
        base = planner(image, torch.as_tensor(tok.encode("touch the red block"))[None], q)
        other_text = planner(image, torch.as_tensor(tok.encode("touch the blue block"))[None], q)
        other_image = planner(255 - image, torch.as_tensor(tok.encode("touch the red block"))[None],
                              q)
    assert not torch.allclose(base, other_text)
    assert not torch.allclose(base, other_image)


def test_follower_contract_and_bound() -> None:
    torch.manual_seed(0)
    f = Follower(residual_scale=0.05).eval()
    assert count_parameters(f) < 500_000
    ref = torch.randn(4, 8, 6) * 10  # far from q: the residual must still be bounded
    with torch.no_grad():
        r = f(ref, torch.zeros(4, 6), torch.zeros(4, 6))
    assert r.shape == (4, 6)
    assert r.abs().max() <= 0.05 + 1e-6
    assert r.abs().max() > 0  # a live network, not a constant


def test_checkpoint_round_trip(tmp_path: Path, planner: Planner) -> None:
    planner.set_normalisation(torch.full((6,), 0.2), torch.full((6,), 0.7),
                              torch.full((10, 6), 0.05))
    meta = {"joint_names": ["a", "b", "c", "d", "e", "f"], "horizon": 10, "dt_s": 0.1, "seed": 3}
    sha = save_checkpoint(tmp_path / "planner.pt", planner, meta)
    assert len(sha) == 64
    model, back = load_checkpoint(tmp_path / "planner.pt")
    assert isinstance(model, Planner) and not model.training
    assert back["kind"] == "planner" and back["seed"] == 3
    ex = example_inputs(model)
    with torch.no_grad():
        assert torch.equal(model(*ex), planner(*ex))
    assert torch.equal(model.delta_std, planner.delta_std)


def test_load_checkpoint_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(bad)
    torch.save({"format": "other"}, bad)
    with pytest.raises(ValueError, match="not a duet-checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "x.pt", torch.nn.Linear(2, 2), {})


def _export(model: torch.nn.Module, path: Path, inputs: list[str], output: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example_inputs(model), str(path), input_names=inputs,
                          output_names=[output], opset_version=17, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["planner", "follower"])
def test_onnx_export_parity(tmp_path: Path, planner: Planner, kind: str) -> None:
    torch.manual_seed(1)
    model: torch.nn.Module
    if kind == "planner":
        model, names, out = planner, ["image", "tokens", "q"], "waypoints"
        feeds_t = (torch.randint(0, 256, (1, 96, 96, 3), dtype=torch.uint8),
                   torch.as_tensor(Tokenizer().encode("touch the red block"))[None],
                   torch.randn(1, 6) * 0.5)
        shapes = {"image": [1, 96, 96, 3], "tokens": [1, 16], "q": [1, 6]}
    else:
        model, names, out = Follower().eval(), ["ref", "q", "dq"], "residual"
        feeds_t = (torch.randn(1, 8, 6) * 0.1, torch.randn(1, 6), torch.randn(1, 6))
        shapes = {"ref": [1, 8, 6], "q": [1, 6], "dq": [1, 6]}
    path = tmp_path / f"{kind}.onnx"
    _export(model, path, names, out)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert {i.name: i.shape for i in sess.get_inputs()} == shapes  # static shapes
    got = sess.run([out], {n: t.numpy() for n, t in zip(names, feeds_t, strict=True)})[0]
    with torch.no_grad():
        want = model(*feeds_t).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4
