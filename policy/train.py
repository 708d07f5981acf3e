"""Training of the reference planner and follower from fixed seeds.

Both are plain supervised regressions on datasets from `policy.data`: the planner imitates
the scripted expert's chunk (normalised deltas from q, Huber loss), the follower regresses the
servo-dynamics residual target. Splits are by episode so validation sees unseen scenes.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from policy.models import Follower, Planner, count_parameters
from runtime.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from policy.rollout import LoopSettings
    from runtime.config import DuetConfig

Log = Callable[[str], None]


@dataclass
class TrainResult:
    model: torch.nn.Module
    metrics: dict[str, Any]


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_threads() -> int:
    """Half the cores (at most 4), or one when the machine is already busy."""
    busy = os.getloadavg()[0] >= 1.0
    return 1 if busy else min(4, max(2, (os.cpu_count() or 2) // 2))


def split_by_episode(episode: np.ndarray, val_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train/val samples; whole episodes go to one side."""
    ids = np.unique(episode)
    rng = np.random.default_rng(seed)
    n_val = max(1, round(len(ids) * val_fraction)) if len(ids) > 1 else 0
    val_ids = set(rng.choice(ids, size=n_val, replace=False).tolist())
    is_val = np.array([e in val_ids for e in episode.tolist()], dtype=bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def fit(model: torch.nn.Module, tensors: dict[str, torch.Tensor], train_idx: np.ndarray,
        val_idx: np.ndarray, loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        steps: int, batch: int, lr: float, seed: int, device: torch.device, log: Log,
        name: str, frozen: tuple[torch.nn.Module, ...] = (), keep_best: bool = False
        ) -> dict[str, Any]:
    """AdamW with warmup + cosine; returns loss history and final train/val losses.
    `frozen` submodules keep their weights and stay in eval mode (BatchNorm statistics).
    `keep_best`: judge the held-out loss at every log line (and before the first step) and
    end with the weights that did best there (a small correction on little data overfits)."""
    model.to(device).train()
    for module in frozen:
        module.eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    train_t = torch.as_tensor(train_idx)
    warmup = min(200, max(1, steps // 10))
    history: list[tuple[int, float]] = []
    t0 = time.monotonic()
    running = 0.0
    log_every = max(1, steps // 10)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def judge(step: int) -> str:
        nonlocal best
        if not keep_best or len(val_idx) == 0:
            return ""
        model.eval()
        val = _evaluate(tensors, val_idx, loss_fn, device)
        model.train()
        if val is not None and (best is None or val < best[0]):
            best = (val, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
        return f", held out {val:.4f}"

    judge(0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        pick = train_t[torch.randint(len(train_t), (batch,), generator=gen)]
        loss = loss_fn({k: v[pick].to(device) for k, v in tensors.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            history.append((step + 1, running / n))
            held = judge(step + 1)
            log(f"  {name} step {step + 1}/{steps} loss {running / n:.4f}{held} "
                f"({time.monotonic() - t0:.0f} s)")
            running = 0.0
    model.eval()
    kept = {}
    if best is not None:
        model.load_state_dict(best[2])
        kept = {"kept_step": best[1]}
        log(f"  {name}: kept the weights of step {best[1]} (best held-out loss {best[0]:.4f})")
    return {"steps": steps, "batch": batch, "lr": lr, "history": history, **kept,
            "train_loss": _evaluate(tensors, train_idx[:4096], loss_fn, device),
            "val_loss": _evaluate(tensors, val_idx, loss_fn, device),
            "train_s": round(time.monotonic() - t0, 1)}


@torch.no_grad()
def _evaluate(tensors: dict[str, torch.Tensor], idx: np.ndarray,
              loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
              device: torch.device) -> float | None:
    if len(idx) == 0:
        return None
    total, n = 0.0, 0
    for start in range(0, len(idx), 256):
        pick = torch.as_tensor(idx[start:start + 256])
        b = {k: v[pick].to(device) for k, v in tensors.items()}
        total += float(loss_fn(b)) * len(pick)
        n += len(pick)
    return total / n


def chunk_loss(pred: torch.Tensor, chunk: torch.Tensor, delta_std: torch.Tensor
               ) -> torch.Tensor:
    """Huber loss on the chunk error in units of the per-waypoint delta scale."""
    return F.smooth_l1_loss((pred - chunk) / delta_std, torch.zeros_like(pred), beta=0.1)


def perception_loss(out: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                    n_colours: int) -> torch.Tensor:
    """Block xy (cm, visible blocks only), visibility (BCE) and target order (CE)."""
    vis = b["visible"].float()
    xy_err = (out["blocks_xy"] - b["blocks_xy"]).norm(dim=-1) / 0.01  # cm
    xy = (F.smooth_l1_loss(xy_err, torch.zeros_like(xy_err), reduction="none") * vis).sum() \
        / vis.sum().clamp_min(1.0)
    order = F.cross_entropy(out["order"].reshape(-1, n_colours), b["order"].reshape(-1),
                            ignore_index=-1)
    return xy + order + F.binary_cross_entropy_with_logits(out["visible"], vis)


def planner_loss(model: Planner, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The supervised loss on a batch of labelled sim scenes: end-to-end chunk, the action
    MLP's chunk from the true target, block xy, visibility and target order."""
    out = model.forward_all(b["image"], b["tokens"], b["q"])
    return (chunk_loss(out["waypoints"], b["chunk"], model.delta_std)
            + perception_loss(out, b, model.n_colours)
            + chunk_loss(model.act(b["target_xy"], b["q"]), b["chunk"], model.delta_std))


def train_planner(data: dict[str, np.ndarray], actions: dict[str, np.ndarray],
                  tokenizer: Tokenizer, steps: int, seed: int, batch: int = 48,
                  action_batch: int = 512, lr: float = 2e-3, device: torch.device | None = None,
                  log: Log = print, **model_kwargs: Any) -> TrainResult:
    """Imitation with auxiliary perception losses.

    data (rendered scenes): image uint8 [N,96,96,3], tokens int64 [N,16], q [N,6],
    chunk [N,H,6], blocks_xy [N,C,2], visible [N,C], order int64 [N,2] (-1 = none),
    target_xy [N,2], episode [N]. actions (no image): q [M,6], target_xy [M,2], chunk [M,H,6].
    Loss per step: end-to-end chunk error (normalised deltas, Huber) on a scene batch; the
    action MLP's chunk error from the true target on an action batch; block xy (cm, visible
    blocks only), visibility (BCE) and target order (CE) on the scene batch.
    """
    seed_everything(seed)
    device = device or pick_device()
    horizon, n_joints = data["chunk"].shape[1:]
    model = Planner(tokenizer.vocab_size, n_joints=n_joints, horizon=horizon,
                    max_tokens=tokenizer.max_len, n_colours=data["blocks_xy"].shape[1],
                    **model_kwargs)
    train_idx, val_idx = split_by_episode(data["episode"], 0.1, seed)
    aq = torch.as_tensor(actions["q"], dtype=torch.float32)
    adelta = torch.as_tensor(actions["chunk"], dtype=torch.float32) - aq[:, None, :]
    model.set_normalisation(aq.mean(0), aq.std(0), adelta.pow(2).mean(0).sqrt())
    tensors = {k: torch.as_tensor(data[k]) for k in
               ("image", "tokens", "q", "chunk", "blocks_xy", "visible", "order", "target_xy")}
    atensors = {k: torch.as_tensor(actions[k], dtype=torch.float32)
                for k in ("q", "target_xy", "chunk")}
    agen = torch.Generator().manual_seed(seed + 1)
    log(f"planner: {count_parameters(model) / 1e6:.2f} M params, {len(train_idx)} train / "
        f"{len(val_idx)} val scenes, {len(aq)} action samples, {steps} steps on {device}")

    def loss_fn(b: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = planner_loss(model, b)
        if model.training:  # the action MLP also learns from the cheap image-free samples
            pick = torch.randint(len(aq), (action_batch,), generator=agen)
            a = {k: v[pick].to(device) for k, v in atensors.items()}
            loss = loss + chunk_loss(model.act(a["target_xy"], a["q"]), a["chunk"],
                                     model.delta_std)
        return loss

    metrics = fit(model, tensors, train_idx, val_idx, loss_fn, steps, batch, lr, seed,
                   device, log, "planner")
    metrics.update(_planner_errors(model, tensors, val_idx, device))
    metrics["params"] = count_parameters(model)
    return TrainResult(model.cpu(), metrics)


@torch.no_grad()
def _planner_errors(model: Planner, tensors: dict[str, torch.Tensor], idx: np.ndarray,
                    device: torch.device) -> dict[str, Any]:
    """Validation errors: chunk (rad; mean, first and last waypoint), next-target xy (m),
    visibility and target-order accuracy."""
    if len(idx) == 0:
        return {}
    errs, txy, vis_ok, order_ok, n_order = [], [], 0, 0, 0
    for start in range(0, len(idx), 256):
        pick = torch.as_tensor(idx[start:start + 256])
        b = {k: v[pick].to(device) for k, v in tensors.items()}
        out = model.forward_all(b["image"], b["tokens"], b["q"])
        errs.append((out["waypoints"] - b["chunk"]).abs().cpu())
        txy.append((out["target_xy"] - b["target_xy"]).norm(dim=-1).cpu())
        vis_ok += int(((out["visible"] > 0).float() == b["visible"]).sum())
        known = b["order"] >= 0
        order_ok += int((out["order"].argmax(-1) == b["order"])[known].sum())
        n_order += int(known.sum())
    e, t = torch.cat(errs), torch.cat(txy)
    return {"val_mae_rad": float(e.mean()), "val_mae_first_rad": float(e[:, 0].mean()),
            "val_mae_last_rad": float(e[:, -1].mean()),
            "val_target_err_m": {"median": float(t.median()), "p90": float(t.quantile(0.9))},
            "val_visible_acc": vis_ok / (len(idx) * model.n_colours),
            "val_order_acc": order_ok / max(1, n_order)}


def train_follower(data: dict[str, np.ndarray], steps: int, seed: int, batch: int = 256,
                   lr: float = 2e-3, residual_max: float = 0.05,
                   device: torch.device | None = None, log: Log = print,
                   correction: bool = False, **model_kwargs: Any) -> TrainResult:
    """data: ref [M,8,6], q [M,6], dq [M,6], residual [M,6], episode [M].
    `correction`: the net corrects another follower (tracking_followers.LearnedFollower): it
    starts at zero output, so it starts as that follower, and keeps its best held-out step."""
    seed_everything(seed)
    device = device or pick_device()
    lookahead, n_joints = data["ref"].shape[1:]
    model = Follower(n_joints=n_joints, lookahead=lookahead, residual_scale=residual_max,
                     **model_kwargs)
    if correction:
        last = model.net[-1]
        assert isinstance(last, torch.nn.Linear)
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
    train_idx, val_idx = split_by_episode(data["episode"], 0.1, seed)
    t = {k: torch.as_tensor(data[k], dtype=torch.float32) for k in ("ref", "q", "dq", "residual")}
    rel = t["ref"][train_idx] - t["q"][train_idx, None, :]
    model.set_normalisation(rel.reshape(-1, n_joints).std(0), t["q"][train_idx].mean(0),
                            t["q"][train_idx].std(0), t["dq"][train_idx].std(0))
    log(f"follower: {count_parameters(model) / 1e3:.0f} k params, {len(train_idx)} train / "
        f"{len(val_idx)} val samples, {steps} steps on {device}")

    def loss_fn(b: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = model(b["ref"], b["q"], b["dq"])
        return F.mse_loss(pred / model.residual_scale, b["residual"] / model.residual_scale)

    metrics = fit(model, t, train_idx, val_idx, loss_fn, steps, batch, lr, seed, device, log,
                   "follower", keep_best=correction)
    with torch.no_grad():
        idx = torch.as_tensor(val_idx)
        pred = model(t["ref"][idx].to(device), t["q"][idx].to(device), t["dq"][idx].to(device))
        target = t["residual"][idx].to(device)
        var = float(target.var()) if len(idx) > 1 else 0.0
        metrics["val_mae_rad"] = float((pred - target).abs().mean())
        metrics["val_r2"] = 1.0 - float((pred - target).pow(2).mean()) / var if var else None
    metrics["params"] = count_parameters(model)
    return TrainResult(model.cpu(), metrics)


def write_calibration(path: Path, pdata: dict[str, np.ndarray], fdata: dict[str, np.ndarray],
                      seed: int, n: int = 256) -> None:
    """Recorded sim observations for INT8 calibration, keyed `<model>/<input>` (duet export
    --calib-data)."""
    rng = np.random.default_rng(seed)
    pi = rng.choice(len(pdata["q"]), size=min(n, len(pdata["q"])), replace=False)
    fi = rng.choice(len(fdata["q"]), size=min(n, len(fdata["q"])), replace=False)
    arrays: dict[str, Any] = {f"planner/{k}": pdata[k][pi] for k in ("image", "tokens", "q")}
    arrays.update({f"follower/{k}": fdata[k][fi] for k in ("ref", "q", "dq")})
    np.savez(path, **arrays)


def write_contract(path: Path, joints: list[str], settings: LoopSettings) -> None:
    """The reference pair's contract (policy/reference_contract.yaml) for this robot's joints
    and rates: what `duet export --contract` takes for these checkpoints."""
    import yaml

    from policy.reference import CONTRACT

    contract = yaml.safe_load(CONTRACT.read_text())
    contract["rates"] = {"planner_hz": settings.planner_hz, "follower_hz": settings.follower_hz}
    contract["planner"]["actions"]["joints"] = joints
    path.write_text("# written by `duet train` from policy/reference_contract.yaml\n"
                    + yaml.safe_dump(contract, sort_keys=False))


@dataclass
class TrainingData:
    """The cached datasets of `policy.data` as both planners train on them."""

    config: DuetConfig
    settings: LoopSettings
    rollouts: dict[str, np.ndarray]  # planner samples of the expert rollouts
    follower: dict[str, np.ndarray]
    scenes: dict[str, np.ndarray]  # rollout samples + rendered kinematic-walk scenes
    actions: dict[str, np.ndarray]  # image-free kinematic-walk samples
    stats: dict[str, Any]


def load_training_data(data_dir: Path, config_path: Path, episodes: int, scenes: int,
                       walks: int, seed: int, workers: int, log: Log = print) -> TrainingData:
    """Rollout episodes (physics, the runtime's tracking path) feed the follower and part of
    the planner's scenes; kinematic walks (`policy.synth`) add rendered scenes and
    image-free action samples for the planner. Cached under data_dir."""
    from policy.data import load_or_generate, load_or_generate_synth
    from policy.rollout import LoopSettings
    from runtime.config import load_config

    cfg = load_config(config_path)
    settings = LoopSettings.from_config(cfg)
    two_step = cfg.sim.two_step_fraction if cfg.sim else 0.5
    pdata, fdata, dstats = load_or_generate(data_dir, episodes, seed, settings, two_step, log,
                                            cfg)
    sdata, adata = load_or_generate_synth(data_dir, scenes, walks, seed, two_step, workers, log,
                                          cfg)
    dstats.update(scene_samples=len(sdata["q"]), action_samples=len(adata["q"]))
    scenes_all = {k: np.concatenate([pdata[k], sdata[k].astype(pdata[k].dtype)])
                  for k in pdata}
    return TrainingData(cfg, settings, pdata, fdata, scenes_all, adata, dstats)


def train_all(out_dir: Path, episodes: int, planner_steps: int, follower_steps: int, seed: int,
              data_dir: Path, threads: int, config_path: Path, scenes: int = 6000,
              walks: int = 20000, workers: int = 1, log: Log = print) -> dict[str, Any]:
    """Data (cached, `load_training_data`) -> planner + follower checkpoints +
    train-metrics.json in out_dir."""
    from policy.models import save_checkpoint

    torch.set_num_threads(threads)
    data = load_training_data(data_dir, config_path, episodes, scenes, walks, seed, workers,
                              log)
    cfg, settings, dstats = data.config, data.settings, data.stats
    pdata, fdata, scenes_all, adata = data.rollouts, data.follower, data.scenes, data.actions
    tok = Tokenizer()
    device = pick_device()
    planner = train_planner(scenes_all, adata, tok, planner_steps, seed, device=device, log=log)
    follower = train_follower(fdata, follower_steps, seed, residual_max=settings.core.residual_max,
                              device=device, log=log)
    common = {"joint_names": list(cfg.robot.joints), "horizon": int(pdata["chunk"].shape[1]),
              "dt_s": settings.dt_s, "lookahead": settings.lookahead,
              "lookahead_dt_s": settings.lookahead_dt, "planner_hz": settings.planner_hz,
              "follower_hz": settings.follower_hz, "seed": seed,
              "dataset": {k: v for k, v in dstats.items() if k != "seconds"},
              "torch_version": str(torch.__version__)}
    out_dir.mkdir(parents=True, exist_ok=True)
    shas = {
        "planner": save_checkpoint(out_dir / "planner.pt", planner.model,
                                   {**common, "tokenizer": tok.to_dict(),
                                    "dataset_sha256": dstats.get("planner_sha256"),
                                    "metrics": planner.metrics}),
        "follower": save_checkpoint(out_dir / "follower.pt", follower.model,
                                    {**common, "residual_max": settings.core.residual_max,
                                     "dataset_sha256": dstats.get("follower_sha256"),
                                     "metrics": follower.metrics}),
    }
    tok.save(out_dir / "tokenizer.json")
    write_contract(out_dir / "contract.yaml", list(cfg.robot.joints), settings)
    write_calibration(out_dir / "calib.npz", pdata, fdata, seed)
    report = {"dataset": dstats, "planner": planner.metrics, "follower": follower.metrics,
              "checkpoints_sha256": shas, "device": str(device), "threads": threads}
    (out_dir / "train-metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"saved {out_dir}/planner.pt (val MAE {planner.metrics.get('val_mae_rad', 0):.4f} rad), "
        f"{out_dir}/follower.pt (val R2 {follower.metrics.get('val_r2')})")
    return report
