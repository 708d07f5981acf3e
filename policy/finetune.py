"""`duet train --dataset DIR --init CKPT`: post-train the reference pair on recorded episodes
(a LeRobotDataset v3.0 from `duet dataset export`), mixed with the sim data it was trained on.

Planner: every step draws a batch of recorded frames and a batch of labelled sim scenes (the
full loss of `policy.train.planner_loss`), `sim_fraction` of the samples from the sim, so the
new task is learned without forgetting the old ones. The camera stem is frozen (the camera and
the scene are the same; what is new is the task), which also makes a step ~3x cheaper on a CPU.
Validation: recorded episodes held out whole.

Recorded frames carry no labels but the demonstration itself, so the grounding's target order
is read back from it in hindsight (`demonstrated_order`): at each frame, the block whose chunk
from the planner's own action head best matches where the arm went is the block the operator
was heading for; per episode, the first such block and the next different one are the first
and second target. Recorded loss: end-to-end chunk error plus the order cross-entropy on those
labels. Without the order term the chunk error alone barely moves a confident grounding (its
softmax is saturated, so the gradient through it vanishes).

Follower: copied from the initial checkpoint. Its training target is the servo-dynamics
residual against the planner's reference, and a recording holds the follower's command
(reference + residual), not the reference alone, so recordings do not supervise it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from policy.lerobot_data import load_planner_samples
from policy.models import Planner, load_checkpoint, save_checkpoint
from policy.train import chunk_loss, fit, planner_loss, seed_everything, split_by_episode
from runtime.model.tokenizer import Tokenizer

Log = Callable[[str], None]
SIM_KEYS = ("image", "tokens", "q", "chunk", "blocks_xy", "visible", "order", "target_xy")


def finetune(init: Path, dataset: Path, out: Path, sim: dict[str, np.ndarray],
             steps: int, seed: int, threads: int, sim_fraction: float = 0.5, batch: int = 32,
             lr: float = 5e-4, camera: str = "scene", log: Log = print) -> dict[str, Any]:
    """Fine-tune init/planner.pt; write out/ (planner.pt, follower.pt, tokenizer.json,
    calib.npz, train-metrics.json) as `duet train` does, so `duet export` takes it."""
    if not 0.0 <= sim_fraction < 1.0:
        raise ValueError(f"sim_fraction must be in [0, 1), got {sim_fraction}")
    torch.set_num_threads(threads)
    seed_everything(seed)
    model, meta = load_checkpoint(init / "planner.pt")
    if not isinstance(model, Planner):
        raise ValueError(f"{init / 'planner.pt'}: not a planner checkpoint")
    tok = Tokenizer.load(init / "tokenizer.json")
    rec = load_planner_samples(dataset, tok, model.horizon, float(meta["dt_s"]), camera)
    train_idx, val_idx = split_by_episode(rec["episode"], 0.2, seed)
    tensors = {k: torch.as_tensor(v) for k, v in rec.items() if k != "episode"}
    model.eval()
    sim_t = {k: torch.as_tensor(sim[k]) for k in SIM_KEYS}
    sim_batch = round(batch * sim_fraction / (1.0 - sim_fraction))
    gen = torch.Generator().manual_seed(seed + 1)
    log(f"fine-tune: {len(train_idx)} recorded train / {len(val_idx)} val frames from "
        f"{len(np.unique(rec['episode']))} episodes + {len(sim['q'])} sim scenes; per step "
        f"{batch} recorded + {sim_batch} sim ({sim_fraction:.0%} sim), {steps} steps")

    rec["order"] = demonstrated_order(model, tensors, rec["episode"])
    tensors["order"] = torch.as_tensor(rec["order"])
    labelled = int((rec["order"][:, 0] >= 0).sum())
    log(f"fine-tune: target order read from the demonstrations for {labelled} of "
        f"{len(rec['q'])} frames")

    def loss_fn(b: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model.forward_all(b["image"], b["tokens"], b["q"])
        loss = chunk_loss(out["waypoints"], b["chunk"], model.delta_std) + F.cross_entropy(
            out["order"].reshape(-1, model.n_colours), b["order"].reshape(-1), ignore_index=-1)
        if model.training and sim_batch:
            pick = torch.randint(len(sim_t["q"]), (sim_batch,), generator=gen)
            loss = loss + sim_fraction / (1 - sim_fraction) * planner_loss(
                model, {k: v[pick] for k, v in sim_t.items()})
        return loss

    before = _chunk_error(model, tensors, val_idx)
    t0 = time.monotonic()
    metrics = fit(model, tensors, train_idx, val_idx, loss_fn, steps, batch, lr, seed,
                  torch.device("cpu"), log, "planner fine-tune", frozen=(model.vision,))
    metrics.update(val_mae_rad_before=before, val_mae_rad=_chunk_error(model, tensors, val_idx),
                   recorded_frames=len(rec["q"]), sim_scenes=len(sim["q"]),
                   sim_fraction=sim_fraction, seconds=round(time.monotonic() - t0, 1))
    out.mkdir(parents=True, exist_ok=True)
    info = {"init": str(init), "dataset": str(dataset), "metrics": metrics}
    sha = save_checkpoint(out / "planner.pt", model, {**{k: v for k, v in meta.items()
                                                        if k != "kind"}, "finetune": info})
    for name in ("follower.pt", "tokenizer.json", "calib.npz"):
        if (init / name).exists():
            shutil.copyfile(init / name, out / name)
    report = {"planner": metrics, "planner_sha256": sha, "follower": "copied from init",
              "init": str(init), "dataset": str(dataset), "threads": threads}
    (out / "train-metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"saved {out}/planner.pt: recorded val chunk MAE {before:.4f} -> "
        f"{metrics['val_mae_rad']:.4f} rad")
    return report


@torch.no_grad()
def demonstrated_order(model: Planner, t: dict[str, torch.Tensor], episode: np.ndarray,
                       batch: int = 128) -> np.ndarray:
    """Per frame int64 [N, 2]: the colour index of the first and the second target of its
    episode as the demonstration shows them (-1: not shown, e.g. a one-target episode)."""
    best = []
    for i in np.array_split(np.arange(len(episode)), max(1, len(episode) // batch)):
        xy, _ = model.vision(t["image"][i])  # [B, C, 2]: where the planner sees each block
        q, chunk = t["q"][i], t["chunk"][i]
        err = torch.stack([(model.act(xy[:, c], q) - chunk).abs().mean((1, 2))
                           for c in range(model.n_colours)], dim=1)  # [B, C]
        best.append(err.argmin(1).numpy())
    heading = np.concatenate(best) if best else np.zeros(0, dtype=np.int64)
    out = np.full((len(episode), 2), -1, dtype=np.int64)
    for e in np.unique(episode):
        idx = np.flatnonzero(episode == e)
        seq = heading[idx]
        first = int(np.bincount(seq[: max(1, len(seq) // 3)]).argmax())
        rest = seq[np.argmax(seq == first):]  # from where it first heads for `first`
        later = rest[rest != first]
        out[idx, 0] = first
        if len(later) >= 3:
            out[idx, 1] = int(np.bincount(later).argmax())
    return out


@torch.no_grad()
def _chunk_error(model: Planner, t: dict[str, torch.Tensor], idx: np.ndarray) -> float:
    """Mean absolute waypoint error (rad) on the given recorded frames."""
    model.eval()
    errs = [(model(t["image"][i], t["tokens"][i], t["q"][i]) - t["chunk"][i]).abs().mean()
            * len(i) for i in np.array_split(idx, max(1, len(idx) // 128)) if len(i)]
    return float(sum(errs) / max(1, len(idx)))
