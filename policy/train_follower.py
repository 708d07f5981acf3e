"""`duet train-follower`: from a robot's tracking recordings (`duet identify`, or any
recording of the robot tracking references: the data loop's episodes too) to the three
followers a bundle can ship, each in a bundle built from the planner bundle given:

- none: reference tracking (the servos alone);
- model-free: the identified servo model, inverted (no network);
- learned: model-free plus a correction trained by hindsight on the same recordings.

Reported: what each leaves of the hindsight target on held-out stretches of the recordings,
and, on the sim robot, tracking RMS on held-out excitation references in lockstep.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.follower_swap import with_follower
from export.onnx_export import export_onnx
from policy.models import Follower
from policy.tracking_followers import LearnedFollower, ModelFreeFollower, hindsight, predict
from policy.train import train_follower
from runtime.config import DuetConfig
from runtime.follower.gravity import GravityChain
from runtime.follower.identification import Track, fit

KINDS = ("none", "model-free", "learned")
PARITY_SAMPLES = 8


def _export(module: torch.nn.Module, n: int, lookahead: int, path: Path) -> None:
    args = (torch.zeros(1, lookahead, n), torch.zeros(1, n), torch.zeros(1, n))
    export_onnx(module, args, ["ref", "q", "dq"], ["residual"], path, f"follower {path.stem}")


def train(cfg: DuetConfig, tracks: list[Track], used: list[str], base: Path, out: Path,
          steps: int = 1500, correction_max: float = 0.02, lookahead: int = 8,
          lookahead_dt: float = 0.02, seed: int = 0, eval_refs: int = 2, eval_s: float = 12.0,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    joints = list(cfg.robot.joints)
    tick_s = 1.0 / cfg.follower.hz
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    chain, gain = description_gravity(cfg)
    log("gravity: " + ("the robot's description" if chain else
                       "free trig terms (no description of these joints)"))
    model = fit(tracks, joints, tick_s, used, chain=chain, gain=gain)
    model.save(out / "servo_model.json")
    data = hindsight(tracks, lookahead, lookahead_dt, tick_s)
    base_module = ModelFreeFollower(model, lookahead, lookahead_dt)
    base_pred = predict(base_module, data)
    corr = dict(data, residual=(data["residual"] - base_pred).astype(np.float32))
    result = train_follower(corr, steps, seed, residual_max=correction_max,
                            log=log, correction=True, hidden=128,
                            pose_aware=False)
    correction = result.model
    assert isinstance(correction, Follower)
    learned = LearnedFollower(base_module, correction).eval()
    fit_s = time.monotonic() - t0
    # held-out stretches: the episodes train_follower's split kept for validation
    from policy.train import split_by_episode

    _, val = split_by_episode(data["episode"], 0.1, seed)
    held = {k: v[val] for k, v in data.items()}
    target = held["residual"]
    offline = {"none": _rms(target), "model-free": _rms(target - predict(base_module, held)),
               "learned": _rms(target - predict(learned, held))}
    modules = {"model-free": base_module, "learned": learned}
    bundles: dict[str, str] = {}
    samples = {k: held[k][:PARITY_SAMPLES] for k in ("ref", "q", "dq")}
    for kind in KINDS:
        module = modules.get(kind)
        onnx = source = None
        if module is not None:
            onnx = out / f"follower-{kind}.onnx"
            _export(module, len(joints), lookahead, onnx)
            source = partial(predict, module)
        with_follower(base, out / f"bundle-{kind}", kind, onnx, source=source,
                      samples=samples if module else None, lookahead=lookahead,
                      lookahead_dt=lookahead_dt, tool="duet train-follower")
        bundles[kind] = str(out / f"bundle-{kind}")
    report: dict[str, Any] = {
        "recordings": used, "samples": len(data["q"]), "held_out": len(val),
        "fit_and_train_s": round(fit_s, 1), "steps": steps,
        "servo_model": model.table(), "offline_rms_mrad": _mrad(offline), "bundles": bundles,
        "correction": result.metrics}
    if cfg.sim is not None and eval_refs > 0:
        report["lockstep_rms_mrad"] = lockstep(cfg, out, len(joints), lookahead, lookahead_dt,
                                               eval_refs, eval_s, seed)
    # The one to ship: the lowest tracking RMS on held-out references in the sim, else the
    # least left of the hindsight target. A correction trained on a few recordings can do
    # worse than the model under it; the report says so rather than leaving it to the table.
    judged = report.get("lockstep_rms_mrad") or report["offline_rms_mrad"]
    report["ship"] = min(judged, key=judged.get)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report


def description_gravity(cfg: DuetConfig) -> tuple[GravityChain | None, list[float] | None]:
    """The gravity model of the robot the config describes (its `sim.robot` MJCF, or duet's
    own arm) and its servos' nominal position gains, if the description's joints are the
    config's."""
    from sim.robot import describe

    robot = describe(cfg)
    if list(robot.joints) != list(cfg.robot.joints):
        return None, None
    return robot.gravity_chain(), [float(k) for k in robot.motors.kp]


def lockstep(cfg: DuetConfig, out: Path, n: int, lookahead: int, lookahead_dt: float,
             refs: int, seconds: float, seed: int) -> dict[str, float]:
    """Tracking RMS (mrad) of each follower on held-out excitation references (sim)."""
    from policy.follower_eval import excitation_refs, onnx_follower, track_references
    from policy.rollout import LoopSettings

    settings = LoopSettings.from_config(cfg)
    exc = excitation_refs(cfg, refs, seed, seconds)
    out_rms = {}
    for kind in KINDS:
        path = out / f"follower-{kind}.onnx"
        follower = onnx_follower(path, n, lookahead, lookahead_dt) if path.exists() else None
        out_rms[kind] = round(
            track_references(cfg, settings, follower, exc, 10, 0.1).rms_rad * 1e3, 3)
    return out_rms


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def _mrad(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v * 1e3, 3) for k, v in d.items()}
