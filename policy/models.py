"""The reference dual-system policy: `Planner` (System 2) and `Follower` (System 1).

Both forwards follow the bundle's model I/O contract exactly, take raw robot-unit inputs and
carry their normalisation as buffers, so an exported ONNX graph needs no pre/post-processing:

- Planner(image uint8 [B,96,96,3], tokens int64 [B,16], q float32 [B,6]) -> waypoints [B,10,6],
  absolute joint targets at t_obs + (k+1)·dt.
- Follower(ref [B,8,6], q [B,6], dq [B,6]) -> residual [B,6], added to the reference command.

Only ops that export at opset 17 with static shapes and that ONNX Runtime quantizes (Conv,
MatMul/Gemm) or leaves in float (Softmax, LayerNorm, GELU, Sigmoid) are used.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn

CHECKPOINT_FORMAT = "duet-checkpoint/1"
IMAGE_SIZE = 96
# ImageNet-style statistics: a fixed normalisation is enough for a rendered scene.
_RGB_MEAN = (0.485, 0.456, 0.406)
_RGB_STD = (0.229, 0.224, 0.225)
# Table xy normalisation (m) for block positions: the task's blocks lie within ~0.2 m of this.
TABLE_CENTRE = (0.33, 0.0)
TABLE_SCALE = 0.2


def _table_centre() -> torch.Tensor:
    return torch.tensor(TABLE_CENTRE)


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    # BatchNorm folds into the conv at export, so the graph stays Conv+Relu (INT8-friendly).
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class ColourKeypoints(nn.Module):
    """Image -> where each block colour is on the table, and whether it is still coloured.

    A small CoordConv stem at half resolution ends in one heatmap per block colour; a spatial
    softmax gives its expected image position (sub-pixel); the stem's per-channel peaks say
    whether each colour is visible at all (a touched block turns grey). A shared MLP maps the image
    position to table xy (the table is a plane, so this is a fixed smooth map). Both are
    supervised directly during training, which is what makes the planner learn in minutes.
    """

    grid: torch.Tensor
    coords: torch.Tensor
    rgb_mean: torch.Tensor
    rgb_std: torch.Tensor
    table_centre: torch.Tensor

    def __init__(self, n_colours: int, channels: int, map_size: int = IMAGE_SIZE // 2) -> None:
        super().__init__()
        c = channels
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, IMAGE_SIZE),
                                torch.linspace(-1, 1, IMAGE_SIZE), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None])  # [1,2,96,96]
        self.register_buffer("rgb_mean", torch.tensor(_RGB_MEAN).reshape(1, 3, 1, 1))
        self.register_buffer("rgb_std", torch.tensor(_RGB_STD).reshape(1, 3, 1, 1))
        # 96 -> 48: 2 px per heatmap cell, a block covers ~2x2 cells.
        self.stem = nn.Sequential(_conv(5, c // 2, 2), _conv(c // 2, c, 1), _conv(c, c, 1))
        self.heatmaps = nn.Conv2d(c, n_colours, 1)
        gy, gx = torch.meshgrid(torch.linspace(-1, 1, map_size), torch.linspace(-1, 1, map_size),
                                indexing="ij")
        self.register_buffer("grid", torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1))
        self.register_buffer("table_centre", _table_centre())
        # "is this colour anywhere in view": from every channel's strongest response (a
        # heatmap's own peak cannot tell, its softmax always finds something)
        self.present = nn.Linear(c, n_colours)
        self.to_table = nn.Sequential(nn.Linear(2, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                                      nn.Linear(64, 2))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image uint8 [B,96,96,3] -> (table xy [B,C,2] in metres, visible logit [B,C])."""
        b = image.shape[0]
        x = image.permute(0, 3, 1, 2).float() * (1.0 / 255.0)
        x = (x - self.rgb_mean) / self.rgb_std
        x = torch.cat([x, self.coords.expand(b, -1, -1, -1)], dim=1)
        feat = self.stem(x)
        heat = self.heatmaps(feat)
        flat = heat.reshape(b, heat.shape[1], -1)
        uv = torch.softmax(flat, dim=-1) @ self.grid  # [B,C,2] in [-1,1] image coordinates
        peak = feat.reshape(b, feat.shape[1], -1).max(dim=-1).values  # [B,c]
        xy = self.to_table(uv) * TABLE_SCALE + self.table_centre
        return xy, self.present(peak)


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer written out in plain ops (Linear, MatMul, Softmax,
    LayerNorm, GELU): nn.TransformerEncoderLayer's fused inference path does not export."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.step(x, mask=mask)[0]

    def step(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None,
             mask: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B,N,D] attends to the cached keys/values `past` (each [B,heads,M,head_dim])
        and to itself; `mask` [N, M+N] is added to the attention scores. Returns the output
        and the keys/values including x's (an autoregressive decoder's cache)."""
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5
        if mask is not None:
            scores = scores + mask
        att = torch.softmax(scores, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x)), (k, v)


class Grounding(nn.Module):
    """Transformer over the instruction's tokens and one token per block colour (its identity
    plus where the camera sees it): which colour is the first and which the second target.

    Reading the instruction *against the scene* is the planner's reasoning step; the
    tokenizer is the planner's own (`runtime/model/tokenizer.py`), no pretrained weights.
    """

    def __init__(self, vocab_size: int, max_tokens: int, n_colours: int, dim: int = 256,
                 layers: int = 3, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        self.colour = nn.Parameter(torch.randn(n_colours, dim) * 0.02)
        self.scene = nn.Linear(3, dim)  # (table x, y normalised, visible probability)
        self.layers = nn.Sequential(*[EncoderLayer(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.order = nn.Linear(dim, 2)  # per colour token: first-target and second-target logit

    def forward(self, tokens: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
        """tokens int64 [B,T], scene [B,C,3] -> order logits [B,2,C]."""
        words = self.embed(tokens) + self.position
        colours = self.colour + self.scene(scene)
        t = tokens.shape[1]
        h = self.norm(self.layers(torch.cat([words, colours], dim=1)))
        return self.order(h[:, t:]).transpose(1, 2)


class Planner(nn.Module):
    """System 2: (image, instruction tokens, joint state) -> chunk of absolute joint targets.

    Localise, select, act:
    1. `ColourKeypoints`: table xy and visibility of every block colour from the image;
    2. `Grounding` (a small transformer over instruction tokens and colour tokens): which
       colour is the first and which the second target; the next target is the first one
       while it is still coloured, else the second (soft, so the whole graph is
       differentiable and exports as plain ops);
    3. an MLP maps (q, next target xy) to normalised deltas from q, scaled and added to q.
    `forward_all` also returns the intermediate predictions for the auxiliary losses.
    """

    kind: ClassVar[str] = "planner"
    q_mean: torch.Tensor
    q_std: torch.Tensor
    delta_std: torch.Tensor
    table_centre: torch.Tensor

    def __init__(self, vocab_size: int, n_joints: int = 6, horizon: int = 10,
                 max_tokens: int = 16, n_colours: int = 4, stem_channels: int = 32,
                 hidden: int = 256, n_hidden: int = 3, dim: int = 256, layers: int = 3) -> None:
        super().__init__()
        self.kwargs: dict[str, Any] = {
            "vocab_size": vocab_size, "n_joints": n_joints, "horizon": horizon,
            "max_tokens": max_tokens, "n_colours": n_colours, "stem_channels": stem_channels,
            "hidden": hidden, "n_hidden": n_hidden, "dim": dim, "layers": layers}
        self.n_joints, self.horizon, self.max_tokens = n_joints, horizon, max_tokens
        self.n_colours = n_colours
        self.vision = ColourKeypoints(n_colours, stem_channels)
        self.grounding = Grounding(vocab_size, max_tokens, n_colours, dim, layers)
        trunk: list[nn.Module] = []
        width = n_joints + 2
        for _ in range(n_hidden):
            trunk += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.trunk = nn.Sequential(*trunk)
        self.head = nn.Linear(hidden, horizon * n_joints)
        # Joint normalisation (set from the dataset by `set_normalisation`, baked into ONNX).
        self.register_buffer("q_mean", torch.zeros(n_joints))
        self.register_buffer("q_std", torch.ones(n_joints))
        self.register_buffer("delta_std", torch.ones(horizon, n_joints))
        self.register_buffer("table_centre", _table_centre())

    def set_normalisation(self, q_mean: torch.Tensor, q_std: torch.Tensor,
                          delta_std: torch.Tensor) -> None:
        self.q_mean.copy_(q_mean)
        self.q_std.copy_(q_std.clamp_min(1e-3))
        self.delta_std.copy_(delta_std.clamp_min(1e-3))

    def table_frame(self, xy: torch.Tensor) -> torch.Tensor:
        """Table xy (m) -> the normalised frame the networks read."""
        return (xy - self.table_centre) / TABLE_SCALE

    def features(self, target_xy: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """(next target table xy [B,2], q [B,6]) -> the action MLP's features [B,hidden]."""
        return self.trunk(torch.cat([(q - self.q_mean) / self.q_std,
                                     self.table_frame(target_xy)], dim=1))

    def act(self, target_xy: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """(next target table xy [B,2], q [B,6]) -> waypoints [B,H,6]."""
        b = q.shape[0]
        delta = self.head(self.features(target_xy, q)).reshape(b, self.horizon, self.n_joints)
        return q[:, None, :] + delta * self.delta_std

    def perceive(self, image: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Steps 1 and 2: block xy, visibility, target order and the next target's xy."""
        xy, visible = self.vision(image)
        scene = torch.cat([self.table_frame(xy), torch.sigmoid(visible)[..., None]], dim=-1)
        order = self.grounding(tokens, scene)
        w = torch.softmax(order, dim=-1)  # [B,2,C]
        first_done = (w[:, 0] * torch.sigmoid(-visible)).sum(-1, keepdim=True)  # [B,1]
        picked = w @ xy  # [B,2,2]: xy of the first and the second target
        target = (1.0 - first_done) * picked[:, 0] + first_done * picked[:, 1]
        return {"blocks_xy": xy, "visible": visible, "order": order, "target_xy": target}

    def forward_all(self, image: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        out = self.perceive(image, tokens)
        out["waypoints"] = self.act(out["target_xy"], q)
        return out

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.forward_all(image, tokens, q)["waypoints"]


class Follower(nn.Module):
    """System 1: (reference window, q, dq) -> bounded residual on the next command.

    The window enters relative to q (what matters is where the reference goes from here), q
    and dq normalised; the output is tanh-bounded and scaled by `residual_scale`.
    """

    kind: ClassVar[str] = "follower"
    residual_scale: torch.Tensor
    ref_scale: torch.Tensor
    q_mean: torch.Tensor
    q_std: torch.Tensor
    dq_std: torch.Tensor

    def __init__(self, n_joints: int = 6, lookahead: int = 8, hidden: int = 256,
                 residual_scale: float = 0.05, pose_aware: bool = True) -> None:
        super().__init__()
        self.kwargs: dict[str, Any] = {"n_joints": n_joints, "lookahead": lookahead,
                                       "hidden": hidden, "residual_scale": residual_scale,
                                       "pose_aware": pose_aware}
        self.n_joints, self.lookahead = n_joints, lookahead
        # pose_aware: the absolute pose is an input (gravity, pose-dependent friction); a
        # correction on top of a model that has gravity does without it and cannot memorise
        # where in the workspace the few recordings went
        self.pose_aware = pose_aware
        self.net = nn.Sequential(
            nn.Linear(lookahead * n_joints + (2 if pose_aware else 1) * n_joints, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, n_joints),
        )
        self.register_buffer("residual_scale", torch.full((n_joints,), float(residual_scale)))
        self.register_buffer("ref_scale", torch.ones(n_joints))
        self.register_buffer("q_mean", torch.zeros(n_joints))
        self.register_buffer("q_std", torch.ones(n_joints))
        self.register_buffer("dq_std", torch.ones(n_joints))

    def set_normalisation(self, ref_scale: torch.Tensor, q_mean: torch.Tensor,
                          q_std: torch.Tensor, dq_std: torch.Tensor) -> None:
        self.ref_scale.copy_(ref_scale.clamp_min(1e-3))
        self.q_mean.copy_(q_mean)
        self.q_std.copy_(q_std.clamp_min(1e-3))
        self.dq_std.copy_(dq_std.clamp_min(1e-3))

    def forward(self, ref: torch.Tensor, q: torch.Tensor, dq: torch.Tensor) -> torch.Tensor:
        b = ref.shape[0]
        rel = ((ref - q[:, None, :]) / self.ref_scale).reshape(b, self.lookahead * self.n_joints)
        parts = [rel, (q - self.q_mean) / self.q_std] if self.pose_aware else [rel]
        x = torch.cat([*parts, dq / self.dq_std], dim=1)
        return torch.tanh(self.net(x)) * self.residual_scale


# Checkpoint kinds -> "module:Class" (imported on load: the FACT modules build on this one).
_KINDS: dict[str, str] = {
    "planner": "policy.models:Planner", "follower": "policy.models:Follower",
    "fact_tokenizer": "policy.fact:FactTokenizer",
    "fact_planner": "policy.fact_planner:FactPlanner"}


def _model_class(kind: str) -> type[nn.Module]:
    module, name = _KINDS[kind].split(":")
    cls: type[nn.Module] = getattr(importlib.import_module(module), name)
    return cls


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def example_inputs(model: nn.Module, batch: int = 1) -> tuple[torch.Tensor, ...]:
    """Contract-shaped example inputs (for export tracing and tests)."""
    if isinstance(model, Planner):
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8,
                              generator=g),
                torch.zeros(batch, model.max_tokens, dtype=torch.int64),
                torch.zeros(batch, model.n_joints))
    if isinstance(model, Follower):
        return (torch.zeros(batch, model.lookahead, model.n_joints),
                torch.zeros(batch, model.n_joints), torch.zeros(batch, model.n_joints))
    raise TypeError(f"not a duet model: {type(model).__name__}")


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> str:
    """Write kind, constructor kwargs, state_dict and meta; return the file's sha256.

    meta holds joint names, horizon, dt_s, lookahead spacing, training seed and dataset hash
    (plain JSON-able values).
    """
    kind = getattr(model, "kind", None)
    if kind not in _KINDS or type(model) is not _model_class(kind):
        raise TypeError(f"not a duet model: {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    kwargs = cast(dict[str, Any], model.kwargs)
    torch.save({"format": CHECKPOINT_FORMAT, "kind": kind, "kwargs": dict(kwargs),
                "state_dict": state, "meta": dict(meta)}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model (eval mode, CPU) and return it with its meta (plus `kind`)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path}: cannot read checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    kind = ckpt.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{path}: unknown model kind {kind!r}")
    model = _model_class(kind)(**ckpt["kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    meta = dict(ckpt["meta"])
    meta["kind"] = kind
    return model, meta
