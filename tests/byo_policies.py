"""Planners a company might bring, defined here (not in policy/) and exported through the same
`export_bundle` a user calls. Untrained, but with behaviour a test can check exactly:

- `TwoCameraPlanner`: scene (NCHW float, normalised) + wrist (NCHW float, scaled) cameras, an
  instruction through a Hugging Face `tokenizers` WordLevel JSON (left padding, attention
  mask), a q history of 4 states 50 ms apart, and *normalised deltas* for five of the six
  joints (the gripper is not driven: it must hold). It moves toward the pose its instruction
  names: "go left" / "go right".
- `FlowPlanner`: an encoder (camera + q -> the chunk x1 in its action space) and a
  velocity field v(x_t, t) = (x1 - x_t) / (1 - t): the rectified flow toward x1, so K Euler
  steps from any noise reach x1 exactly -- a check of the runtime's integration.
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sim_arm import JOINTS
from torch import nn

from export.pipeline import ExportOptions, export_bundle, load_contract
from sim.robot import default_robot

HOME_Q = default_robot().home

DRIVEN = JOINTS[:5]
H, DT = 10, 0.1
HOME = HOME_Q[:5]  # the sim's home pose, driven joints
GOALS = {"left": HOME + np.array([0.5, 0.1, -0.2, 0.1, 0.3]),
         "right": HOME + np.array([-0.5, -0.1, 0.1, -0.1, -0.3])}
ACT_MEAN = np.array([0.01, -0.02, 0.03, 0.0, 0.05])
ACT_STD = np.array([0.2, 0.1, 0.15, 0.1, 0.3])
WORDS = ["[PAD]", "[UNK]", "go", "left", "right", "home"]
MAX_LEN = 6


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


class TwoCameraPlanner(nn.Module):
    """delta[k] = goal(instruction) - q_now for every k, normalised with ACT_MEAN/STD.

    (A ramp from q_now would restart at the *measured* position every plan, and a servo's
    gravity sag would then walk the arm away, one plan at a time: a real hazard of
    delta-from-observation policies on position servos, but not what this test checks.)"""

    def __init__(self) -> None:
        super().__init__()
        goals = torch.zeros(len(WORDS), len(DRIVEN))
        goals[WORDS.index("left")] = torch.tensor(GOALS["left"], dtype=torch.float32)
        goals[WORDS.index("right")] = torch.tensor(GOALS["right"], dtype=torch.float32)
        self.register_buffer("goals", goals)
        self.register_buffer("mean", torch.tensor(ACT_MEAN, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(ACT_STD, dtype=torch.float32))

    def forward(self, scene: torch.Tensor, wrist: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor, q_hist: torch.Tensor) -> torch.Tensor:
        # left padding: the last token is the instruction's last word ("left" / "right")
        goal = self.goals[tokens[:, -1]] * mask[:, -1:].float()
        q_now = q_hist[:, -1]  # history oldest first
        delta = (goal - q_now)[:, None, :].expand(-1, H, -1)
        seen = 0.0 * (scene.mean() + wrist.mean())  # both cameras are real graph inputs
        return (delta - self.mean) / self.std + seen


TWO_CAMERA_CONTRACT: dict[str, Any] = {
    "rates": {"planner_hz": 5.0, "follower_hz": 500.0},
    "planner": {
        "stages": [{"name": "policy", "file": "policy.onnx", "inputs": [
            {"role": "camera", "name": "scene", "camera": "scene", "height": 64, "width": 64,
             "layout": "NCHW", "dtype": "float32", "scale": 1 / 255,
             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            {"role": "camera", "name": "wrist", "camera": "wrist", "height": 48, "width": 48,
             "layout": "NCHW", "dtype": "float32", "scale": 1 / 255, "resize": "none"},
            {"role": "instruction", "name": "tokens", "tokenizer": "tokenizer.json",
             "kind": "hf-tokenizers", "max_len": MAX_LEN, "padding_side": "left",
             "mask": "mask"},
            {"role": "proprio", "name": "q_hist", "field": "q", "history": 4,
             "spacing_s": 0.05}],
            "outputs": [{"role": "actions", "name": "deltas"}]}],
        "actions": {"horizon": H, "dt_s": DT, "kind": "delta", "joints": DRIVEN,
                    "mean": ACT_MEAN.tolist(), "std": ACT_STD.tolist()}},
}


class FlowEncoder(nn.Module):
    """x1 = a chunk that goes to GOALS['left'] (all six joints: gripper held), depending on
    q only through a term that vanishes there (so the features are a real function of q)."""

    def __init__(self, goal: np.ndarray | None = None) -> None:
        """`goal`: another robot's joint goal (default duet's arm's left block)."""
        super().__init__()
        goal = np.r_[GOALS["left"], 0.1] if goal is None else np.asarray(goal)
        self.register_buffer("goal", torch.tensor(goal, dtype=torch.float32))
        self.register_buffer("decay", torch.exp(-torch.arange(H) - 3.0))

    def forward(self, image: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        seen = 0.0 * image.float().mean()
        return self.goal + (q - self.goal)[:, None, :] * self.decay[None, :, None] + seen


class FlowVelocity(nn.Module):
    """The rectified-flow velocity toward x1: Euler from t = 0 lands on x1 at t = 1."""

    def forward(self, x1: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x1 - x_t) / (1.0 - t)


FLOW_CONTRACT: dict[str, Any] = {
    "rates": {"planner_hz": 5.0, "follower_hz": 500.0},
    "planner": {
        "stages": [
            {"name": "encoder", "file": "encoder.onnx", "inputs": [
                {"role": "camera", "name": "image", "camera": "scene", "height": 96,
                 "width": 96},
                {"role": "proprio", "name": "q", "field": "q", "joints": JOINTS}],
             "outputs": [{"role": "features", "name": "x1", "shape": [1, H, 6]}]},
            {"name": "decoder", "file": "decoder.onnx", "flow": {"steps": 10}, "inputs": [
                {"role": "stage", "name": "x1", "source": "encoder.x1"},
                {"role": "noise", "name": "x_t"},
                {"role": "flow_time", "name": "t"}],
             "outputs": [{"role": "velocity", "name": "v"}]}],
        "actions": {"horizon": H, "dt_s": DT, "kind": "absolute", "joints": JOINTS}},
}


def build(out: Path, contract: dict[str, Any], modules: dict[str, nn.Module],
          tokenizer: bool = False) -> Path:
    src = out.with_name(out.name + ".src")
    src.mkdir(parents=True, exist_ok=True)
    (src / "contract.yaml").write_text(yaml.safe_dump(contract))
    if tokenizer:
        write_tokenizer(src / "tokenizer.json")
    with contextlib.redirect_stdout(io.StringIO()):
        return export_bundle(load_contract(src / "contract.yaml"), modules, out,
                             ExportOptions(calib=8, parity_samples=4), src)


def two_camera_bundle(out: Path) -> Path:
    return build(out, TWO_CAMERA_CONTRACT, {"policy": TwoCameraPlanner()}, tokenizer=True)


def flow_bundle(out: Path, config: Path | None = None) -> Path:
    """The flow planner for duet's arm, or (`config`) for the robot a config describes: its
    joints, and a goal 0.25 rad from its home on every joint (within its limits)."""
    if config is None:
        return build(out, FLOW_CONTRACT, {"encoder": FlowEncoder(), "decoder": FlowVelocity()})
    from runtime.config import load_config
    from sim.robot import describe

    cfg = load_config(config)
    joints, robot = list(cfg.robot.joints), describe(cfg)
    contract = copy.deepcopy(FLOW_CONTRACT)
    encoder = contract["planner"]["stages"][0]
    encoder["inputs"][1]["joints"] = joints
    encoder["outputs"][0]["shape"] = [1, H, len(joints)]
    contract["planner"]["actions"]["joints"] = joints
    goal = np.clip(robot.home + 0.25, robot.q_min, robot.q_max)
    return build(out, contract, {"encoder": FlowEncoder(goal), "decoder": FlowVelocity()})


# ------------------------------------------------------------------ autoregressive tokens
AR_H, AR_LAYERS, AR_E = 4, 2, 16
AR_BINS = 32  # action token ids 0..31 (bins or FAST's BPE ids), then END and BOS
AR_END, AR_BOS = AR_BINS, AR_BINS + 1
AR_VOCAB = AR_BINS + 2
AR_TOKENS = AR_H * len(JOINTS)  # one chunk: H steps x 6 joints
AR_MAX_STEPS = AR_TOKENS + 4
AR_T = 1 + AR_MAX_STEPS  # the KV buffer: the context at 0, then one slot per step
AR_KV = [1, AR_LAYERS, 2, AR_T, AR_E]
AR_DELTA = 0.05  # bins span +-0.05 rad deltas from the observed q


class ARPrefill(nn.Module):
    """q -> the KV buffer with the context (a projection of q) at position 0, zeros after."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.ctx = nn.Linear(len(JOINTS), AR_LAYERS * 2 * AR_E)
        self.register_buffer("at0", (torch.arange(AR_T) == 0).float().view(1, 1, 1, AR_T, 1))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.ctx(q).view(-1, AR_LAYERS, 2, 1, AR_E) * self.at0


class ARDecodeStep(nn.Module):
    """One decoding step over a fixed-size KV buffer: the token and the position in, this
    step's keys and values written at the position (a one-hot blend: static shapes), causal
    attention over the buffer, the greedy next token out. END is forced after one chunk's
    tokens and never before, so a plan stops on the end token."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(AR_VOCAB, AR_E)
        self.pos = nn.Embedding(AR_T, AR_E)
        self.qkv = nn.ModuleList(nn.Linear(AR_E, 3 * AR_E) for _ in range(AR_LAYERS))
        self.mix = nn.ModuleList(nn.Linear(AR_E, AR_E) for _ in range(AR_LAYERS))
        self.head = nn.Linear(AR_E, AR_VOCAB)
        never, done = torch.zeros(AR_VOCAB), torch.zeros(AR_VOCAB)
        never[AR_END] = never[AR_BOS] = done[AR_BOS] = -1e4
        done[AR_END] = 1e4
        self.register_buffer("never", never)
        self.register_buffer("done", done)
        self.register_buffer("slots", torch.arange(AR_T))

    def forward(self, kv_in: torch.Tensor, tok_in: torch.Tensor, pos: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(tok_in[:, 0]) + self.pos(pos)
        here = (self.slots[None] == pos[:, None]).float()[..., None]  # [B, T, 1]
        seen = self.slots[None] <= pos[:, None]
        layers = []
        for qkv, mix, kv in zip(self.qkv, self.mix, kv_in.unbind(1), strict=True):
            q, k, v = qkv(x).chunk(3, -1)
            keys = kv[:, 0] * (1 - here) + here * k[:, None]
            values = kv[:, 1] * (1 - here) + here * v[:, None]
            att = (keys @ q[..., None])[..., 0] / AR_E ** 0.5
            att = att.masked_fill(~seen, -1e9).softmax(-1)
            x = x + mix((att[..., None] * values).sum(1))
            layers.append(torch.stack([keys, values], 1))
        over = (pos[:, None] >= 1 + AR_TOKENS).float()
        logits = self.head(torch.tanh(x)) + over * self.done + (1 - over) * self.never
        return logits.argmax(-1, keepdim=True), torch.stack(layers, 1)


def ar_greedy(q: np.ndarray) -> list[int]:
    """The PyTorch source's own decoding loop (what the loop stage must reproduce)."""
    prefill, step = ARPrefill().eval(), ARDecodeStep().eval()
    tokens: list[int] = []
    with torch.no_grad():
        kv = prefill(torch.tensor(q[None], dtype=torch.float32))
        tok = torch.tensor([[AR_BOS]])
        for k in range(AR_MAX_STEPS):
            tok, kv = step(kv, tok, torch.tensor([1 + k]))
            if int(tok) == AR_END:
                break
            tokens.append(int(tok))
    return tokens


def ar_contract(detokenizer: dict[str, Any]) -> dict[str, Any]:
    return {
        "rates": {"planner_hz": 5.0, "follower_hz": 500.0},
        "planner": {
            "stages": [
                {"name": "prefill", "file": "prefill.onnx",
                 "inputs": [{"role": "proprio", "name": "q", "field": "q"}],
                 "outputs": [{"role": "features", "name": "kv0", "shape": AR_KV}]},
                {"name": "decode", "file": "decode.onnx",
                 "loop": {"max_steps": AR_MAX_STEPS, "end_token": AR_END,
                          "detokenizer": detokenizer},
                 "inputs": [
                     {"role": "carry", "name": "kv_in", "output": "kv_out",
                      "source": "prefill.kv0"},
                     {"role": "carry", "name": "tok_in", "output": "token", "fill": AR_BOS},
                     {"role": "position", "name": "pos", "start": 1}],
                 "outputs": [{"role": "token", "name": "token"},
                             {"role": "features", "name": "kv_out", "shape": AR_KV}]}],
            "actions": {"horizon": AR_H, "dt_s": 0.1, "kind": "delta", "joints": JOINTS}},
    }


AR_BINS_DETOKENIZER = {"kind": "bins", "bins": AR_BINS, "low": [-AR_DELTA] * len(JOINTS),
                       "high": [AR_DELTA] * len(JOINTS)}


def ar_bundle(out: Path, detokenizer: dict[str, Any] | None = None) -> Path:
    """The tiny autoregressive planner, exported; bins unless `detokenizer` says (a FAST one
    names a tokenizer file, expected beside the contract in `out`.src)."""
    return build(out, ar_contract(detokenizer or AR_BINS_DETOKENIZER),
                 {"prefill": ARPrefill(), "decode": ARDecodeStep()})
