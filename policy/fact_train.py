"""Training of the FACT tokenizer and the FACT planner from fixed seeds (`duet train-fact`).

Data are the reference planner's (`policy.data`, cached): rendered scenes (rollouts + walks)
and image-free action samples. The tokenizer learns chunk deltas from q of the action samples.
The planner's targets are prefix-conditioned (real-time chunking): per sample a prefix length
d ~ U{0..d_max}; the prefix is the expert's first d waypoints with the error of a previous
plan (an offset growing along the chunk), and the target chunk is that prefix followed by the
expert's continuation from the prefix's last waypoint. The planner is fed the prefix and
learns the target's codes (bitwise cross-entropy, teacher forcing) plus the decoded chunk
after the prefix (`masked_chunk_loss`, through the frozen decoder).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from policy.data import MAX_CHUNK_NOISE
from policy.fact import FactTokenizer, bits_of
from policy.fact_planner import FactPlanner
from policy.models import Planner, count_parameters
from policy.train import (
    Log,
    TrainingData,
    TrainResult,
    chunk_loss,
    fit,
    perception_loss,
    seed_everything,
    split_by_episode,
)
from runtime.model.bundle import sha256_file
from runtime.model.tokenizer import Tokenizer
from sim.expert import expert_chunk
from sim.robot import describe
from sim.world import BLOCK_HALF, ArmKinematics

TARGET_Z = 2 * BLOCK_HALF  # m, a target's top face (the expert's goal height reference)


def prefix_targets(q: np.ndarray, chunk: np.ndarray, target_xy: np.ndarray, d_max: int,
                   seed: int, kin: ArmKinematics) -> dict[str, np.ndarray]:
    """Per sample: prefix [N,d_max,6] (zero beyond prefix_len), prefix_len [N] int64 and the
    target chunk [N,H,6]: the prefix, then the expert from the prefix's last waypoint."""
    rng = np.random.default_rng(seed)
    n, horizon, joints = chunk.shape
    lengths = rng.integers(0, d_max + 1, size=(n,))
    # a previous plan's error: a random offset per joint growing along the chunk
    sigma = kin.robot.start_noise(MAX_CHUNK_NOISE[1], MAX_CHUNK_NOISE[0], MAX_CHUNK_NOISE[2])
    offset = rng.normal(0.0, 1.0, (n, 1, joints)) * rng.uniform(0.0, 1.0, (n, 1, 1)) \
        * sigma * np.linspace(0.2, 1.0, horizon)[None, :d_max, None]
    valid = np.arange(d_max)[None, :] < lengths[:, None]
    prefix = np.where(valid[..., None], chunk[:, :d_max] + offset, 0.0).astype(np.float32)
    target = chunk.astype(np.float32).copy()
    for i in np.flatnonzero(lengths):
        d = int(lengths[i])
        remaining = np.array([[target_xy[i, 0], target_xy[i, 1], TARGET_Z]])
        target[i, :d] = prefix[i, :d]
        target[i, d:] = expert_chunk(kin, remaining, prefix[i, d - 1].astype(float),
                                     horizon=horizon - d)
    return {"prefix": prefix, "prefix_len": lengths.astype(np.int64), "target": target}


def encode_codes(tokenizer: FactTokenizer, q: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """FACT codes int8 [N,L,Bits] (+-1) of chunks [N,H,6] taken from q [N,6]."""
    out = []
    for start in range(0, len(q), 8192):
        delta = torch.as_tensor(chunk[start:start + 8192] - q[start:start + 8192, None],
                                dtype=torch.float32)
        out.append(tokenizer.encode(delta).to(torch.int8).numpy())
    return np.concatenate(out)


def masked_chunk_loss(pred: torch.Tensor, target: torch.Tensor, prefix_len: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor:
    """Huber loss on (pred - target) / scale over the waypoints at and after prefix_len
    only: the prefix is given, the planner answers for the rest of the chunk."""
    horizon = pred.shape[1]
    keep = (torch.arange(horizon, device=pred.device)[None, :] >= prefix_len[:, None]).float()
    err = F.smooth_l1_loss((pred - target) / scale, torch.zeros_like(pred), beta=0.1,
                           reduction="none").mean(-1)
    return (err * keep).sum() / keep.sum().clamp_min(1.0)


def decoded_chunk(planner: FactPlanner, tokenizer: FactTokenizer, logits: torch.Tensor,
                  q: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The chunk (absolute rad) the predicted bits decode to in one Euler step, with the
    straight-through gradient of the bits to their logits."""
    soft = torch.tanh(logits)
    codes = soft + (bits_of(logits) - soft).detach()
    noise = torch.randn(q.shape[0], planner.horizon, planner.n_joints, generator=generator)
    x1 = tokenizer.predict_clean(codes, noise, torch.zeros(q.shape[0]))
    return q[:, None, :] + tokenizer.denormalise(x1)


def train_fact_planner(scenes: dict[str, np.ndarray], actions: dict[str, np.ndarray],
                       tokenizer: FactTokenizer, vocab: Tokenizer, steps: int, seed: int,
                       batch: int = 48, action_batch: int = 128, lr: float = 2e-3,
                       decoded_weight: float = 1.0, init: Planner | None = None,
                       log: Log = print, **model_kwargs: Any) -> TrainResult:
    """scenes: the reference planner's scene data plus prefix, prefix_len, target [N,H,6]
    and codes [N,L,Bits]; actions: q, target_xy, chunk plus the same four.

    From scratch, perception, action MLP and code head learn together (the reference's
    losses plus the code losses). With `init` (a trained reference planner), its weights
    are the starting point and its perception (keypoints, grounding) stays frozen: only the
    action MLP and the code head train, several times faster.
    """
    seed_everything(seed)
    horizon, n_joints = scenes["chunk"].shape[1:]
    kwargs = {"n_joints": n_joints, "horizon": horizon, "max_tokens": vocab.max_len,
              "n_colours": scenes["blocks_xy"].shape[1], **model_kwargs}
    if init is not None:
        kwargs = {**init.kwargs, **model_kwargs}
        kwargs.pop("vocab_size")
    model = FactPlanner(vocab.vocab_size, code_len=tokenizer.code_len,
                        code_bits=tokenizer.code_bits, prefix_max=scenes["prefix"].shape[1],
                        **kwargs)
    for p in tokenizer.parameters():
        p.requires_grad_(False)
    train_idx, val_idx = split_by_episode(scenes["episode"], 0.1, seed)
    aq = torch.as_tensor(actions["q"], dtype=torch.float32)
    adelta = torch.as_tensor(actions["chunk"], dtype=torch.float32) - aq[:, None, :]
    if init is None:
        model.set_normalisation(aq.mean(0), aq.std(0), adelta.pow(2).mean(0).sqrt())
    else:
        load_reference(model, init)
    keys = ("image", "tokens", "q", "chunk", "blocks_xy", "visible", "order", "target_xy",
            "prefix", "prefix_len", "target", "codes")
    tensors = {k: torch.as_tensor(scenes[k]) for k in keys}
    tensors["codes"] = tensors["codes"].float()
    atensors = {k: torch.as_tensor(actions[k]) for k in
                ("q", "target_xy", "chunk", "prefix", "prefix_len", "target", "codes")}
    atensors["codes"] = atensors["codes"].float()
    agen = torch.Generator().manual_seed(seed + 1)
    ngen = torch.Generator().manual_seed(seed + 2)
    log(f"fact planner: {count_parameters(model) / 1e6:.2f} M params, {len(train_idx)} train / "
        f"{len(val_idx)} val scenes, {len(aq)} action samples, codes {tokenizer.code_len}x"
        f"{tokenizer.code_bits} bits, prefix <= {model.prefix_max}, {steps} steps")

    def code_loss(features: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
        context = model.context(features, b["q"], b["prefix"], b["prefix_len"])
        logits = model.code_logits(context, b["codes"])
        bce = F.binary_cross_entropy_with_logits(logits, (b["codes"] > 0).float())
        chunk = decoded_chunk(model, tokenizer, logits, b["q"], ngen)
        return bce + decoded_weight * masked_chunk_loss(chunk, b["target"], b["prefix_len"],
                                                        model.delta_std)

    def loss_fn(b: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = chunk_loss(model.act(b["target_xy"], b["q"]), b["chunk"], model.delta_std)
        if init is None:
            out = model.forward_all(b["image"], b["tokens"], b["q"])
            loss = (loss + perception_loss(out, b, model.n_colours)
                    + chunk_loss(out["waypoints"], b["chunk"], model.delta_std))
            target = out["target_xy"]
        else:
            with torch.no_grad():
                target = model.perceive(b["image"], b["tokens"])["target_xy"]
        loss = loss + code_loss(model.features(target, b["q"]), b)
        if model.training:  # the action MLP and the code head learn from image-free samples
            pick = torch.randint(len(aq), (action_batch,), generator=agen)
            a = {k: v[pick] for k, v in atensors.items()}
            loss = loss + chunk_loss(model.act(a["target_xy"], a["q"]), a["chunk"],
                                     model.delta_std)
            loss = loss + code_loss(model.features(a["target_xy"], a["q"]), a)
        return loss

    metrics = fit(model, tensors, train_idx, val_idx, loss_fn, steps, batch, lr, seed,
                  torch.device("cpu"), log, "fact planner")
    metrics.update(planner_errors(model, tokenizer, tensors, val_idx))
    metrics["params"] = count_parameters(model)
    return TrainResult(model, metrics)


def load_reference(model: FactPlanner, reference: Planner) -> None:
    """Start from a trained reference planner: every one of its weights and statistics,
    with its perception (keypoints, grounding) frozen."""
    unexpected = model.load_state_dict(reference.state_dict(), strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"reference planner does not fit the FACT planner: {unexpected}")
    model.freeze_perception()


@torch.no_grad()
def planner_errors(model: FactPlanner, tokenizer: FactTokenizer,
                   tensors: dict[str, torch.Tensor], idx: np.ndarray, steps: int = 4,
                   seed: int = 0) -> dict[str, Any]:
    """Closed-form validation through the exported path (greedy codes, `steps` Euler steps):
    bit accuracy, exact-code rate, chunk MAE (rad) after the prefix, and the tokenizer's own
    round-trip MAE on the same targets (the floor)."""
    if len(idx) == 0:
        return {}
    gen = torch.Generator().manual_seed(seed)
    bit_ok = code_ok = 0
    errs, floor = [], []
    for start in range(0, len(idx), 256):
        pick = torch.as_tensor(idx[start:start + 256])
        b = {k: v[pick] for k, v in tensors.items()}
        codes = model(b["image"], b["tokens"], b["q"], b["prefix"], b["prefix_len"])
        bit_ok += int((codes == b["codes"]).sum())
        code_ok += int((codes == b["codes"]).all(-1).sum())
        keep = torch.arange(model.horizon)[None, :] >= b["prefix_len"][:, None]
        chunk = b["q"][:, None] + tokenizer.decode(codes, steps, gen)
        errs.append((chunk - b["target"]).abs()[keep])
        ideal = b["q"][:, None] + tokenizer.decode(b["codes"], steps, gen)
        floor.append((ideal - b["target"]).abs()[keep])
    n = len(idx)
    return {"val_bit_acc": bit_ok / (n * model.code_len * model.code_bits),
            "val_code_acc": code_ok / (n * model.code_len),
            "val_mae_rad": float(torch.cat(errs).mean()),
            "val_tokenizer_floor_mae_rad": float(torch.cat(floor).mean()),
            "val_decoder_steps": steps}


HELD_OUT_SEED_BASE = 600_000_000  # walks for held-out chunks: away from training and eval


def fact_test_sets(data: TrainingData, seed: int, walks: int = 1000
                   ) -> dict[str, np.ndarray]:
    """Chunk deltas the tokenizer never trains on: walks from seeds no training set uses,
    and the expert rollouts' chunks (closed-loop states; the tokenizer learns from walks)."""
    from policy.synth import action_samples

    two_step = data.config.sim.two_step_fraction if data.config.sim else 0.5
    base = HELD_OUT_SEED_BASE + seed * 1_000_003
    held_out = action_samples(list(range(base, base + walks)), two_step, data.config)
    return {"held-out walks": held_out["chunk"] - held_out["q"][:, None],
            "rollouts": data.rollouts["chunk"] - data.rollouts["q"][:, None]}


def with_prefix_codes(data: dict[str, np.ndarray], tokenizer: FactTokenizer, d_max: int,
                      seed: int, kin: ArmKinematics) -> dict[str, np.ndarray]:
    """data plus prefix, prefix_len, target and the target's codes."""
    extra = prefix_targets(data["q"], data["chunk"], data["target_xy"], d_max, seed, kin)
    extra["codes"] = encode_codes(tokenizer, data["q"], extra["target"])
    return {**data, **extra}


def train_fact(out_dir: Path, data_dir: Path, config_path: Path, seed: int = 0,
               episodes: int = 200, scenes: int = 6000, walks: int = 20000, workers: int = 2,
               threads: int = 2, code_len: int = 20, code_bits: int = 6,
               tokenizer_steps: int = 3000, planner_steps: int = 2000, prefix_max: int = 5,
               held_out: int = 1000, planner_actions: int = 120_000,
               decoder_steps: tuple[int, ...] = (1, 2, 4, 8, 16),
               init_planner: Path | None = None, log: Log = print) -> dict[str, Any]:
    """Data (the reference planner's cache) -> FACT tokenizer -> FACT planner, from fixed
    seeds. Writes fact_tokenizer.pt, fact_planner.pt and fact-metrics.json (with the
    tokenizer's reconstruction error next to both baselines at the same bits) to out_dir,
    and what `duet export` needs beside them (`policy.fact_bundle.write_export_folder`).
    `init_planner`: a reference planner checkpoint to start from (`train_fact_planner`)."""
    from policy.action_baselines import DctQuantizer, UniformBinning
    from policy.fact import fact_roundtrip, reconstruction_error, train_tokenizer
    from policy.fact_bundle import write_export_folder
    from policy.models import load_checkpoint, save_checkpoint
    from policy.train import load_training_data

    t_start = time.monotonic()
    torch.set_num_threads(threads)
    init: Planner | None = None
    if init_planner is not None:
        reference, meta = load_checkpoint(init_planner)
        if not isinstance(reference, Planner) or meta["kind"] != Planner.kind:
            raise ValueError(f"{init_planner}: not a reference planner checkpoint "
                             f"(kind {meta['kind']!r})")
        init = reference
    data = load_training_data(data_dir, config_path, episodes, scenes, walks, seed, workers, log)
    deltas = data.actions["chunk"] - data.actions["q"][:, None]
    t0 = time.monotonic()
    tokenizer = train_tokenizer(deltas, tokenizer_steps, seed, code_len=code_len,
                                code_bits=code_bits, log=log)
    tokenizer_s = time.monotonic() - t0
    tests = fact_test_sets(data, seed, held_out)
    bits = tokenizer.total_bits
    baselines: dict[str, UniformBinning | DctQuantizer] = {
        "uniform_binning": UniformBinning(bits).fit(deltas), "dct": DctQuantizer(bits).fit(deltas)}
    recon: dict[str, Any] = {}
    for name, test in tests.items():
        recon[name] = {"chunks": len(test), **{
            k: reconstruction_error(b.roundtrip, test) for k, b in baselines.items()},
            "fact": {str(k): reconstruction_error(fact_roundtrip(tokenizer, k, seed), test)
                     for k in decoder_steps}}
        fact_rmse = min(v["rmse_rad"] for v in recon[name]["fact"].values())
        log(f"tokenizer ({bits} bits) on {name}: RMSE FACT {fact_rmse * 1e3:.2f} mrad, "
            f"uniform binning {recon[name]['uniform_binning']['rmse_rad'] * 1e3:.2f}, DCT "
            f"{recon[name]['dct']['rmse_rad'] * 1e3:.2f}")
    kin = ArmKinematics(describe(data.config))  # the prefix targets' expert: this robot's
    t0 = time.monotonic()
    scenes_fact = with_prefix_codes(data.scenes, tokenizer, prefix_max, seed, kin)
    # a seeded subset of the image-free samples: 2000 steps x 128 draws need no more, and
    # each prefix target costs an expert call
    pick = np.sort(np.random.default_rng(seed).permutation(len(data.actions["q"]))[
        :planner_actions])
    actions_fact = with_prefix_codes({k: v[pick] for k, v in data.actions.items()}, tokenizer,
                                     prefix_max, seed + 1, kin)
    log(f"prefix targets and codes: {time.monotonic() - t0:.0f} s")
    vocab = Tokenizer()
    planner = train_fact_planner(scenes_fact, actions_fact, tokenizer, vocab, planner_steps,
                                 seed, init=init, log=log)
    common = {"joint_names": list(data.config.robot.joints), "horizon": tokenizer.horizon,
              "dt_s": data.settings.dt_s, "seed": seed,
              "dataset": {k: v for k, v in data.stats.items() if k != "seconds"},
              "torch_version": str(torch.__version__)}
    out_dir.mkdir(parents=True, exist_ok=True)
    shas = {
        "fact_tokenizer": save_checkpoint(
            out_dir / "fact_tokenizer.pt", tokenizer,
            {**common, "action": "delta_from_q", "reconstruction": recon,
             "train_s": round(tokenizer_s, 1)}),
        "fact_planner": save_checkpoint(
            out_dir / "fact_planner.pt", planner.model,
            {**common, "tokenizer": vocab.to_dict(), "metrics": planner.metrics,
             "init_planner_sha256": sha256_file(init_planner) if init_planner else None}),
    }
    report = {"reconstruction": recon, "planner": planner.metrics, "checkpoints_sha256": shas,
              "threads": threads, "tokenizer_train_s": round(tokenizer_s, 1),
              "total_s": round(time.monotonic() - t_start, 1)}
    (out_dir / "fact-metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    follower = init_planner.with_name("follower.pt") if init_planner else None
    assert isinstance(planner.model, FactPlanner)
    write_export_folder(out_dir, tokenizer, planner.model, vocab,
                        follower if follower and follower.is_file() else None,
                        list(data.config.robot.joints),
                        {"planner_hz": data.settings.planner_hz,
                         "follower_hz": data.settings.follower_hz})
    log(f"saved {out_dir}/fact_tokenizer.pt, {out_dir}/fact_planner.pt (val MAE after the "
        f"prefix {planner.metrics.get('val_mae_rad', 0):.4f} rad, bit accuracy "
        f"{planner.metrics.get('val_bit_acc', 0):.3f}); {report['total_s']:.0f} s in all")
    return report
