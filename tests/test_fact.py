"""FACT: Gray-coded bitwise codes, the baselines, the tokenizer round trip, the flow decoder as
the runtime integrates it, the prefix input, the two-stage bundle (exported, in the runtime's
pipeline, live) and a training smoke run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.pipeline import ExportOptions, export_bundle, load_contract
from policy.action_baselines import DctQuantizer, UniformBinning, dct_matrix
from policy.fact import (
    FactDecoderStage,
    FactTokenizer,
    fact_roundtrip,
    gray_bits,
    gray_value,
    reconstruction_error,
    train_tokenizer,
)
from policy.fact_bundle import CONTRACT, write_export_folder
from policy.fact_bundle import modules as fact_modules
from policy.fact_planner import FactPlanner
from policy.fact_study import format_rows, study
from policy.fact_train import load_reference, masked_chunk_loss, prefix_targets
from policy.models import Follower, Planner, load_checkpoint, save_checkpoint
from runtime.model.bundle import load_bundle
from runtime.model.plan import Plan
from runtime.model.tokenizer import Tokenizer
from runtime.planner.observation import StateHistory
from runtime.planner.pipeline import Observation, PlannerPipeline
from sim.expert import expert_chunk
from sim.robot import default_robot
from sim.world import ArmKinematics, SimWorld

JOINTS = default_robot().joints

ROOT = Path(__file__).resolve().parents[1]
SMALL_PLANNER = {"code_len": 4, "code_bits": 3, "prefix_max": 3, "code_dim": 32,
                 "stem_channels": 8, "hidden": 32, "dim": 32, "layers": 1}


def expert_like_chunks(n: int, seed: int) -> np.ndarray:
    """Deltas from q shaped like the expert's: every joint on one time profile toward a
    goal, [n, 10, 6] rad (a 7-parameter family: 6 goals and the profile's pace)."""
    rng = np.random.default_rng(seed)
    goal = rng.normal(0.0, 0.3, (n, 1, 6))
    pace = rng.uniform(0.3, 3.0, (n, 1, 1))
    t = 0.1 * np.arange(1, 11)[None, :, None]
    return (goal * (1.0 - np.exp(-t * pace))).astype(np.float32)


@pytest.fixture(scope="module")
def small_tokenizer() -> FactTokenizer:
    torch.set_num_threads(1)
    return train_tokenizer(expert_like_chunks(20000, 0), steps=600, seed=0, batch=256,
                           code_len=8, code_bits=5, hidden=128, log=lambda _: None)


@pytest.fixture(scope="module")
def small_planner() -> FactPlanner:
    torch.manual_seed(0)
    return FactPlanner(Tokenizer().vocab_size, **SMALL_PLANNER).eval()


def test_gray_codes_round_trip_and_neighbours_differ_by_one_bit() -> None:
    z = torch.linspace(-0.9999, 0.9999, 5001)
    centre, codes = gray_bits(z, 6)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(gray_value(codes), centre)
    assert (centre - z).abs().max() <= 1.0 / 64 + 1e-6  # half a level
    levels, first = np.unique(centre.numpy(), return_index=True)
    assert len(levels) == 64
    steps = (codes[first[1:]] != codes[first[:-1]]).sum(-1)
    assert steps.tolist() == [1] * 63


def test_baselines_spend_exactly_their_bits() -> None:
    train, test = expert_like_chunks(5000, 1), expert_like_chunks(1000, 2)
    m = dct_matrix(10)
    assert np.allclose(m @ m.T, np.eye(10), atol=1e-12)
    binning = UniformBinning(120).fit(train)  # 2 bits per value: 4 levels
    assert binning.quantizer.levels.tolist() == [4] * 60
    dct = DctQuantizer(120).fit(train)
    assert dct.coef_bits.sum() == 120
    # the allocation favours the low frequencies of a smooth chunk
    per_freq = dct.coef_bits.reshape(10, 6).sum(1)
    assert per_freq[:3].sum() > per_freq[5:].sum()
    errs = [reconstruction_error(DctQuantizer(b).fit(train).roundtrip, test)["rmse_rad"]
            for b in (30, 60, 120, 240)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.2 * errs[0]
    assert reconstruction_error(binning.roundtrip, test)["rmse_rad"] > errs[2]


@pytest.mark.slow
def test_tokenizer_round_trip_reconstructs_chunks(small_tokenizer: FactTokenizer) -> None:
    """A small tokenizer trained for seconds on a 7-parameter family of chunks reconstructs
    held-out chunks far better than uniform binning at the same 40 bits."""
    train, test = expert_like_chunks(20000, 0), expert_like_chunks(2000, 3)
    codes = small_tokenizer.encode(torch.as_tensor(test))
    assert codes.shape == (2000, 8, 5) and set(codes.unique().tolist()) == {-1.0, 1.0}
    fact = reconstruction_error(fact_roundtrip(small_tokenizer, 4), test)["rmse_rad"]
    binning = reconstruction_error(UniformBinning(40).fit(train).roundtrip, test)["rmse_rad"]
    assert fact < 0.03 and fact < 0.3 * binning, (fact, binning)


def test_study_compares_all_three_at_equal_bits() -> None:
    rows = study(expert_like_chunks(3000, 0), {"a": expert_like_chunks(200, 1)}, [2, 4], 5,
                 steps=30, seed=0, decoder_steps=[1, 2], hidden=32, log=lambda _: None)
    assert [(r["code_len"], r["bits"]) for r in rows] == [(2, 10), (4, 20)]
    assert all(set(r["fact"]) == {"1", "2"} and r["quantizer"] == "gray" for r in rows)
    table = format_rows(rows).splitlines()
    assert len(table) == 4 and "| FACT K=2 |" in table[0]
    ratio = min(rows[1]["fact"][k]["rmse_rad"] for k in "12") \
        / rows[1]["uniform_binning"]["rmse_rad"]
    assert table[3].endswith(f"| {ratio:.3f} |")


@pytest.mark.slow
def test_decoder_stage_is_the_velocity_the_runtime_integrates(
        small_tokenizer: FactTokenizer) -> None:
    """The runtime's loop over the stage-2 graph (x from N(0,1), x += v/K, then
    x*std + mean) is `decode`; its first Euler step lands on the predicted chunk."""
    tk = small_tokenizer
    codes = tk.encode(torch.as_tensor(expert_like_chunks(3, 4)))
    stage = FactDecoderStage(tk)
    k = 4
    noise = torch.randn(3, 10, 6, generator=torch.Generator().manual_seed(7))
    x = noise.clone()
    with torch.no_grad():
        for i in range(k):
            x = x + stage(codes, x, torch.full((3,), i / k)) / k
        ref = tk.decode(codes, k, torch.Generator().manual_seed(7))
        one = noise + stage(codes, noise, torch.zeros(3))
        x1 = tk.predict_clean(codes, noise, torch.zeros(3))
    assert torch.allclose(x * tk.std + tk.mean, ref, atol=1e-6)
    assert torch.allclose(one, x1, atol=1e-5)
    assert tk.mean.shape == (6,) and tk.std.shape == (6,)  # per-joint, declared


@pytest.mark.slow
def test_checkpoints_of_both_fact_models_load(tmp_path: Path, small_tokenizer: FactTokenizer,
                                              small_planner: FactPlanner) -> None:
    save_checkpoint(tmp_path / "t.pt", small_tokenizer, {"seed": 0})
    save_checkpoint(tmp_path / "p.pt", small_planner, {"seed": 0})
    tk, meta = load_checkpoint(tmp_path / "t.pt")
    planner, pmeta = load_checkpoint(tmp_path / "p.pt")
    assert isinstance(tk, FactTokenizer) and meta["kind"] == "fact_tokenizer"
    assert isinstance(planner, FactPlanner) and pmeta["kind"] == "fact_planner"
    x = torch.as_tensor(expert_like_chunks(5, 5))
    assert torch.equal(tk.encode(x), small_tokenizer.encode(x))
    inputs = small_planner.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(planner(*inputs), small_planner(*inputs))


@pytest.mark.slow
def test_starting_from_a_reference_planner_freezes_its_perception() -> None:
    torch.manual_seed(1)
    planner_kwargs = {k: v for k, v in SMALL_PLANNER.items() if not k.startswith(("code",
                                                                                  "prefix"))}
    reference = Planner(Tokenizer().vocab_size, **planner_kwargs)
    reference.vision.stem[0][1].running_mean.fill_(0.3)  # trained statistics
    torch.manual_seed(2)
    model = FactPlanner(Tokenizer().vocab_size, **SMALL_PLANNER)
    load_reference(model, reference)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    model.train()
    image, tokens = model.example_inputs(4)[:2]
    model.perceive(image, tokens)
    assert torch.equal(model.vision.stem[0][1].running_mean, torch.full((4,), 0.3))
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any(p.requires_grad for p in model.grounding.parameters())
    assert all(p.requires_grad for p in model.trunk.parameters())
    assert all(p.requires_grad for p in model.code_layers.parameters())
    with pytest.raises(ValueError, match="does not fit"):
        load_reference(FactPlanner(Tokenizer().vocab_size, **SMALL_PLANNER),
                       Planner(Tokenizer().vocab_size, **{**planner_kwargs, "layers": 2}))


def _codes(planner: FactPlanner, prefix: torch.Tensor, prefix_len: int) -> torch.Tensor:
    image, tokens, _, _, _ = planner.example_inputs()
    q = torch.tensor([[0.1, 0.2, 1.8, 1.3, 0.0, 0.1]])
    with torch.no_grad():
        return planner(image, tokens, q, prefix, torch.tensor([prefix_len]))


def test_prefix_input_changes_codes_and_padding_is_ignored(small_planner: FactPlanner) -> None:
    p = small_planner
    g = torch.Generator().manual_seed(1)
    prefix = torch.tensor([[0.1, 0.2, 1.8, 1.3, 0.0, 0.1]]).repeat(3, 1)[None] \
        + torch.randn(1, 3, 6, generator=g) * 0.3
    seen = {tuple(_codes(p, prefix + torch.randn(1, 3, 6, generator=g), 2).flatten().tolist())
            for _ in range(20)}
    assert len(seen) > 1  # the codes depend on the prefix
    # waypoints past prefix_len are padding: any value, inf and nan included, changes nothing
    padded = prefix.clone()
    padded[0, 2] = float("nan")
    padded[0, 1] = float("inf")
    assert torch.equal(_codes(p, prefix, 1), _codes(p, padded, 1))
    assert torch.equal(_codes(p, prefix, 0), _codes(p, torch.zeros_like(prefix), 0))
    # teacher forcing and greedy decoding agree: the greedy codes are the argmax of their
    # own teacher-forced logits
    image, tokens, _, _, _ = p.example_inputs()
    q = torch.tensor([[0.1, 0.2, 1.8, 1.3, 0.0, 0.1]])
    with torch.no_grad():
        target = p.perceive(image, tokens)["target_xy"]
        context = p.context(p.features(target, q), q, prefix, torch.tensor([2]))
        codes = p.greedy_codes(context)
        logits = p.code_logits(context, codes)
    assert torch.equal(torch.where(logits >= 0, 1.0, -1.0), codes)


def test_chunk_loss_masks_the_prefix() -> None:
    target = torch.zeros(2, 10, 6)
    pred = torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(0))
    pred.requires_grad_(True)
    lengths = torch.tensor([0, 4])
    loss = masked_chunk_loss(pred, target, lengths, torch.ones(10, 6))
    loss.backward()
    assert pred.grad is not None
    assert (pred.grad[1, :4] == 0).all() and (pred.grad[1, 4:] != 0).all()
    assert (pred.grad[0] != 0).all()
    moved = pred.detach().clone()
    moved[1, :4] += 10.0
    assert masked_chunk_loss(moved, target, lengths, torch.ones(10, 6)) == loss.detach()


def test_prefix_targets_continue_the_prefix_with_the_expert() -> None:
    kin = ArmKinematics()
    rng = np.random.default_rng(0)
    target_xy = np.tile([0.35, 0.1], (40, 1))
    q = np.array([0.0, 0.0, 1.82, 1.33, 0.0, 0.1]) + rng.normal(0, 0.2, (40, 6))
    remaining = np.array([[0.35, 0.1, 0.05]])
    chunk = np.stack([expert_chunk(kin, remaining, qi) for qi in q])
    out = prefix_targets(q, chunk, target_xy, 3, seed=0, kin=kin)
    lengths = out["prefix_len"]
    assert set(lengths.tolist()) == {0, 1, 2, 3}
    for i, d in enumerate(lengths.tolist()):
        assert np.array_equal(out["target"][i, :d], out["prefix"][i, :d])
        assert not out["prefix"][i, d:].any()
        if d == 0:
            assert np.array_equal(out["target"][i], chunk[i])
        else:
            assert not np.allclose(out["prefix"][i, :d], chunk[i, :d])  # a previous plan's error
            tail = expert_chunk(kin, remaining, out["prefix"][i, d - 1].astype(float),
                                horizon=10 - d)
            assert np.allclose(out["target"][i, d:], tail, atol=1e-6)


def _observation(q: np.ndarray, t_obs_ns: int, frame: np.ndarray) -> Observation:
    history = StateHistory(6)
    history.add(t_obs_ns, q=q, dq=np.zeros(6), q_cmd=q)
    return Observation({"scene": frame}, history, t_obs_ns,
                       "touch the red block, then the blue one")



def test_the_fact_contract_names_the_trained_robots_joints(
        tmp_path: Path, small_tokenizer: FactTokenizer) -> None:
    """`duet train-fact --config` on another robot: the contract it writes names that robot's
    joints and rates (it named duet's arm whatever the config, and the SO-101's planner
    was refused at load), and a joint count the tokenizer was not trained on is refused."""
    planner = FactPlanner(Tokenizer().vocab_size, **{
        **SMALL_PLANNER, "code_len": small_tokenizer.code_len,
        "code_bits": small_tokenizer.code_bits})
    so101 = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
    write_export_folder(tmp_path, small_tokenizer, planner, Tokenizer(), None, so101,
                        {"planner_hz": 4.0, "follower_hz": 250.0})
    contract = load_contract(tmp_path / CONTRACT)
    assert contract.planner.actions.joints == so101
    assert (contract.rates.planner_hz, contract.rates.follower_hz) == (4.0, 250.0)
    with pytest.raises(ValueError, match="7 joints, but the tokenizer was trained on 6"):
        write_export_folder(tmp_path, small_tokenizer, planner, Tokenizer(), None,
                            [*so101, "extra"])

@pytest.mark.slow
def test_fact_bundle_through_the_exporter_runs_in_the_runtime_pipeline_as_in_torch(
        tmp_path: Path, small_tokenizer: FactTokenizer) -> None:
    """The export folder `duet train-fact` writes -> `export_bundle` -> the robot's
    `PlannerPipeline`: its plan (the prefix from the previous plan, normalised by the
    runtime, K Euler steps of the decoder graph, de-normalised from q) is the torch
    planner's codes fed the absolute prefix, decoded by the tokenizer from the same noise."""
    folder = tmp_path / "ck"
    torch.manual_seed(0)
    small_planner = FactPlanner(Tokenizer().vocab_size, **{
        **SMALL_PLANNER, "code_len": small_tokenizer.code_len,
        "code_bits": small_tokenizer.code_bits}).eval()
    with pytest.raises(ValueError, match="the tokenizer decodes"):
        write_export_folder(folder, small_tokenizer, FactPlanner(Tokenizer().vocab_size,
                                                                 **SMALL_PLANNER),
                            Tokenizer(), None, JOINTS)
    save_checkpoint(folder / "fact_tokenizer.pt", small_tokenizer, {})
    save_checkpoint(folder / "fact_planner.pt", small_planner, {})
    save_checkpoint(folder / "follower.pt", Follower(hidden=32), {})
    write_export_folder(folder, small_tokenizer, small_planner, Tokenizer(), None, JOINTS)
    contract = load_contract(folder / CONTRACT)
    assert contract.planner.actions.std == [float(v) for v in small_tokenizer.std]
    with contextlib.redirect_stdout(io.StringIO()):
        export_bundle(contract, fact_modules(folder), tmp_path / "b", ExportOptions(), folder)
    bundle = load_bundle(tmp_path / "b", expect_joints=JOINTS)
    assert [s.name for s in bundle.contract.planner.stages] == ["codes", "decoder"]
    k, seed = 4, 5
    pipe = PlannerPipeline(bundle, JOINTS, flow_steps=k, seed=seed)
    rng = np.random.default_rng(1)
    q = np.array([0.1, 0.2, 1.8, 1.3, 0.0, 0.1])
    frame = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    t_obs = 10**9
    previous = q + np.cumsum(rng.normal(0.0, 0.05, (10, 6)), axis=0)
    plan = Plan(previous.astype(np.float32), 0.1, t_obs / 1e9, t_obs / 1e9)
    got = pipe.plan(_observation(q, t_obs, frame), plan, prefix_valid_s=0.25).copy()
    assert pipe.prefixes[0][2] is not None and int(pipe.prefixes[0][2][0]) == 2
    image = torch.from_numpy(pipe.cameras[0].out.copy())
    tokens = torch.from_numpy(pipe.instruction[0][1].copy())
    prefix = torch.zeros(1, SMALL_PLANNER["prefix_max"], 6)
    prefix[0, :2] = torch.as_tensor(previous[:2], dtype=torch.float32)  # absolute, as trained
    q_t = torch.as_tensor(q, dtype=torch.float32)[None]
    noise = np.random.default_rng(seed).standard_normal((1, 10, 6), dtype=np.float32)
    x = torch.from_numpy(noise)
    stage = FactDecoderStage(small_tokenizer)
    with torch.no_grad():
        codes = small_planner(image, tokens, q_t, prefix, torch.tensor([2]))
        for i in range(k):
            x = x + stage(codes, x, torch.tensor([i / k])) / k
    want = (q_t + small_tokenizer.denormalise(x))[0].numpy()
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    # without the prefix (or with prefix conditioning off) the codes see prefix_len 0
    off = PlannerPipeline(bundle, JOINTS, flow_steps=k, seed=seed, prefix=False)
    off.plan(_observation(q, t_obs, frame), plan, prefix_valid_s=0.25)
    assert pipe.prefixes[0][2] is not None and int(off.prefixes[0][2][0]) == 0


def test_the_shipped_fact_bundle_plans_from_a_sim_observation() -> None:
    """bundles/fact through the runtime's pipeline on a rendered sim scene: finite plans that
    start near q and move; more decoder steps converge (K = 4 within 10 mrad of K = 16) and
    depend less on the noise; the instruction changes the plan."""
    bundle = load_bundle(ROOT / "bundles/fact", expect_joints=JOINTS)
    world = SimWorld(seed=3)
    frame = world.render("scene", 96, 96)
    q = world.q()
    obs = _observation(q, 10**9, frame)
    plans = {}
    for k, seed in ((1, 0), (1, 1), (4, 0), (16, 0), (16, 1)):
        pipe = PlannerPipeline(bundle, JOINTS, flow_steps=k, seed=seed)
        plans[k, seed] = w = pipe.plan(obs).copy()
        assert w.shape == (10, 6) and np.isfinite(w).all()
        assert np.abs(w[0] - q).max() < 0.3 and np.abs(w[-1] - w[0]).max() > 0.05
        again = pipe.plan(obs, Plan(w, 0.1, 1.0, 1.0), prefix_valid_s=0.3)
        assert np.isfinite(again).all() and int(pipe.prefixes[0][2][0]) == 3  # type: ignore[index]
    assert np.abs(plans[16, 0] - plans[4, 0]).max() < 0.01
    spread = {k: np.abs(plans[k, 0] - plans[k, 1]).max() for k in (1, 16)}
    assert spread[16] < 0.5 * spread[1], spread
    pipe = PlannerPipeline(bundle, JOINTS, seed=0)
    other = pipe.plan(Observation({"scene": frame}, obs.history, 10**9,
                                  "touch the green block, then the red one"))
    assert np.abs(other - plans[4, 0]).max() > 0.02


@pytest.mark.system
def test_the_shipped_fact_bundle_solves_sim_episodes_through_the_live_stack(
        tmp_path: Path) -> None:
    """`duet run` with bundles/fact: two planner stages (K decoder calls), live camera,
    servos over the pty."""
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "run", "--config", str(ROOT / "configs/sim.yaml"),
         "--set", "follower.deadline_storm.misses=400", "--set", "bundle.path=bundles/fact",
         "--set", f"run_dir={tmp_path / 'run'}", "--duration", "10",
         "--summary-json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert set(summary["planner"]["stage_ms"]) >= {"codes", "decoder"}
    assert summary["task"]["successes"] >= 2 and summary["task"]["success_rate"] >= 0.75, \
        summary["task"]


@pytest.mark.system
@pytest.mark.slow
def test_train_fact_smoke_writes_checkpoints_and_figures(tmp_path: Path) -> None:
    """`duet train-fact --smoke` as a real process: data, tokenizer, reconstruction
    figures against both baselines, planner, loadable checkpoints."""
    env = dict(os.environ, MUJOCO_GL="egl", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "train-fact", "--smoke", "--out",
         str(tmp_path / "ck"), "--data-dir", str(tmp_path / "data"), "--threads", "1",
         "--config", str(ROOT / "configs/sim.yaml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "ck" / "fact-metrics.json").read_text())
    for name in ("held-out walks", "rollouts"):
        recon = report["reconstruction"][name]
        assert recon["chunks"] > 0
        assert set(recon["fact"]) == {"1", "2", "4", "8", "16"}
        assert recon["uniform_binning"]["rmse_rad"] > 0 and recon["dct"]["rmse_rad"] > 0
    assert 0.0 <= report["planner"]["val_bit_acc"] <= 1.0
    tk, meta = load_checkpoint(tmp_path / "ck" / "fact_tokenizer.pt")
    planner, pmeta = load_checkpoint(tmp_path / "ck" / "fact_planner.pt")
    assert isinstance(tk, FactTokenizer) and isinstance(planner, FactPlanner)
    assert meta["action"] == "delta_from_q" and pmeta["dt_s"] == 0.1
    assert (planner.code_len, planner.code_bits) == (tk.code_len, tk.code_bits) == (20, 6)
    assert len(pmeta["tokenizer"]["words"]) > 0
    # the export folder: the filled contract (the tokenizer's statistics), the vocabulary
    contract = load_contract(tmp_path / "ck" / CONTRACT)
    assert contract.planner.actions.mean == [float(v) for v in tk.mean]
    assert contract.planner.stages[0].outputs[0].shape == [1, 20, 6]
    assert (tmp_path / "ck" / "tokenizer.json").is_file()


def test_fact_eval_cells_and_one_delayed_cell_in_the_closed_loop(tmp_path: Path) -> None:
    """`duet eval --fact` plans 1 + |K| planner rows and prefix x strategy x delay cells; a
    cell runs the shipped bundle through the lockstep loop with the injected delay (the plan
    timeout grown by it: no HOLD between plans) and is kept for a rerun."""
    from policy.fact_eval import Cell, _run_and_save, _slug, plan_cells

    cells = plan_cells(ROOT / "bundles/reference", ROOT / "bundles/fact", [1, 4], 3, 2,
                       [0.0, 0.3])
    planners = [c for c in cells if c.table == "planners"]
    grid = [c for c in cells if c.table == "grid"]
    assert sorted(c.name for c in planners) == ["FACT K=1", "FACT K=4", "reference"]
    assert len(grid) == 16 and {(c.prefix, c.strategy, c.delay_s) for c in grid} == {
        (p, s, d) for p in (True, False) for s in ("blend", "broker", "average", "switch")
        for d in (0.0, 0.3)}
    assert len({_slug(c, 0) for c in cells}) == len(cells)
    cell = Cell("grid", "delayed", str(ROOT / "bundles/fact"), None, True, "blend", 0.3, 1)
    path = tmp_path / "cell.json"
    _run_and_save((cell, str(ROOT / "configs/sim.yaml"), 900_000_000, path))
    s = json.loads(path.read_text())["summary"]
    assert s["episodes"] == 1 and s["successes"] == 1, s
    assert s["planner_latency_ms_p99"] >= s["planner_latency_ms_p50"] > 0
    assert set(s["stage_ms"]) >= {"codes", "decoder"}
    # smooth at the boundaries: blend keeps the reference's velocity step small
    assert s["boundary_vel_step_rad_s"]["max"] < 5.0, s["boundary_vel_step_rad_s"]
