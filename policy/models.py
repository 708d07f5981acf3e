"""The reference dual-system policy: `Planner` (System 2) and `Follower` (System 1).

Both forwards follow the bundle's model I/O contract exactly, take raw robot-unit inputs and
carry their normalisation as buffers, so an exported ONNX graph needs no pre/post-processing:

- Planner(image uint8 [B,96,96,3], tokens int64 [B,16], q float32 [B,6]) -> waypoints [B,10,6],
  absolute joint targets at t_obs + (k+1)·dt.
- Follower(ref [B,8,6], q [B,6], dq [B,6]) -> residual [B,6], added to the reference command.

Only ops that export at opset 17 with static shapes and that ONNX Runtime quantizes (Conv,
MatMul/Gemm) or leaves in float (LayerNorm, Softmax, GELU) are used; attention is written out
by hand so the exported graph does not depend on a fused-attention symbolic.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FORMAT = "duet-checkpoint/1"
IMAGE_SIZE = 96
# ImageNet-style statistics: a fixed normalisation is enough for a rendered scene.
_RGB_MEAN = (0.485, 0.456, 0.406)
_RGB_STD = (0.229, 0.224, 0.225)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.d_head)), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer encoder block."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ff(self.ln2(x))


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    # BatchNorm folds into the conv at export, so the graph stays Conv+Relu (INT8-friendly).
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class SpatialSoftmax(nn.Module):
    """Feature map [B,K,H,W] -> K keypoints (expected x, expected y, peak activation).

    The expected coordinates locate each learned detector (e.g. "red block") with sub-pixel
    precision; the peak says whether it sees its feature at all (a touched block turns grey).
    """

    grid: torch.Tensor

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width),
                                indexing="ij")
        self.register_buffer("grid", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1))
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        b, k, h, w = feat.shape
        flat = feat.reshape(b, k, h * w)
        att = torch.softmax(flat * torch.exp(-self.log_temperature), dim=-1)
        xy = att @ self.grid  # [B,K,2]
        peak = flat.max(dim=-1, keepdim=True).values
        return torch.cat([xy, peak], dim=-1)


class Planner(nn.Module):
    """System 2: (image, instruction tokens, joint state) -> chunk of absolute joint targets.

    Conv stem with CoordConv channels -> spatial-softmax keypoints, one token per keypoint;
    instruction token embeddings; one projected joint-state token; a learned readout token.
    A pre-LN transformer encoder mixes them; the readout token predicts normalised deltas
    from q, which forward scales and adds back to q.
    """

    coords: torch.Tensor
    rgb_mean: torch.Tensor
    rgb_std: torch.Tensor
    q_mean: torch.Tensor
    q_std: torch.Tensor
    delta_std: torch.Tensor

    def __init__(self, vocab_size: int, n_joints: int = 6, horizon: int = 10,
                 max_tokens: int = 16, d_model: int = 128, n_layers: int = 3, n_heads: int = 4,
                 d_ff: int = 256, n_keypoints: int = 32, stem_channels: int = 32) -> None:
        super().__init__()
        self.kwargs: dict[str, Any] = {
            "vocab_size": vocab_size, "n_joints": n_joints, "horizon": horizon,
            "max_tokens": max_tokens, "d_model": d_model, "n_layers": n_layers,
            "n_heads": n_heads, "d_ff": d_ff, "n_keypoints": n_keypoints,
            "stem_channels": stem_channels}
        self.n_joints, self.horizon, self.max_tokens = n_joints, horizon, max_tokens
        c = stem_channels
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, IMAGE_SIZE),
                                torch.linspace(-1, 1, IMAGE_SIZE), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None])  # [1,2,96,96]
        self.register_buffer("rgb_mean", torch.tensor(_RGB_MEAN).reshape(1, 3, 1, 1))
        self.register_buffer("rgb_std", torch.tensor(_RGB_STD).reshape(1, 3, 1, 1))
        # 96 -> 48 -> 24; keypoints on a 24x24 map (4 px per cell, sub-cell via softmax).
        self.stem = nn.Sequential(_conv(5, c // 2, 2), _conv(c // 2, c, 1), _conv(c, c, 2),
                                  _conv(c, c, 1), nn.Conv2d(c, n_keypoints, 1))
        self.keypoints = SpatialSoftmax(IMAGE_SIZE // 4, IMAGE_SIZE // 4)
        self.kp_proj = nn.Linear(3, d_model)
        self.kp_embed = nn.Parameter(torch.randn(n_keypoints, d_model) * 0.02)
        self.tok_embed = nn.Embedding(vocab_size, d_model)
        self.tok_pos = nn.Parameter(torch.randn(max_tokens, d_model) * 0.02)
        self.q_proj = nn.Linear(n_joints, d_model)
        self.readout = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.ln_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, horizon * n_joints)
        # Joint normalisation (set from the dataset by `set_normalisation`, baked into ONNX).
        self.register_buffer("q_mean", torch.zeros(n_joints))
        self.register_buffer("q_std", torch.ones(n_joints))
        self.register_buffer("delta_std", torch.ones(horizon, n_joints))

    def set_normalisation(self, q_mean: torch.Tensor, q_std: torch.Tensor,
                          delta_std: torch.Tensor) -> None:
        self.q_mean.copy_(q_mean)
        self.q_std.copy_(q_std.clamp_min(1e-3))
        self.delta_std.copy_(delta_std.clamp_min(1e-3))

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        b = image.shape[0]
        x = image.permute(0, 3, 1, 2).float() * (1.0 / 255.0)
        x = (x - self.rgb_mean) / self.rgb_std
        x = torch.cat([x, self.coords.expand(b, -1, -1, -1)], dim=1)
        kp = self.kp_proj(self.keypoints(self.stem(x))) + self.kp_embed  # [B,K,d]
        txt = self.tok_embed(tokens) + self.tok_pos  # [B,T,d]
        qt = self.q_proj((q - self.q_mean) / self.q_std)[:, None]  # [B,1,d]
        h = torch.cat([self.readout.expand(b, -1, -1), qt, txt, kp], dim=1)
        for block in self.blocks:
            h = block(h)
        delta = self.head(self.ln_out(h[:, 0])).reshape(b, self.horizon, self.n_joints)
        return q[:, None, :] + delta * self.delta_std


class Follower(nn.Module):
    """System 1: (reference window, q, dq) -> bounded residual on the next command.

    The window enters relative to q (what matters is where the reference goes from here), q
    and dq normalised; the output is tanh-bounded and scaled by `residual_scale`.
    """

    residual_scale: torch.Tensor
    ref_scale: torch.Tensor
    q_mean: torch.Tensor
    q_std: torch.Tensor
    dq_std: torch.Tensor

    def __init__(self, n_joints: int = 6, lookahead: int = 8, hidden: int = 256,
                 residual_scale: float = 0.05) -> None:
        super().__init__()
        self.kwargs: dict[str, Any] = {"n_joints": n_joints, "lookahead": lookahead,
                                       "hidden": hidden, "residual_scale": residual_scale}
        self.n_joints, self.lookahead = n_joints, lookahead
        self.net = nn.Sequential(
            nn.Linear(lookahead * n_joints + 2 * n_joints, hidden), nn.GELU(),
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
        x = torch.cat([rel, (q - self.q_mean) / self.q_std, dq / self.dq_std], dim=1)
        return torch.tanh(self.net(x)) * self.residual_scale


_KINDS: dict[str, type[nn.Module]] = {"planner": Planner, "follower": Follower}


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
    if not isinstance(model, (Planner, Follower)):
        raise TypeError(f"not a duet model: {type(model).__name__}")
    kind = "planner" if isinstance(model, Planner) else "follower"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "kind": kind, "kwargs": dict(model.kwargs),
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
    model = _KINDS[kind](**ckpt["kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    meta = dict(ckpt["meta"])
    meta["kind"] = kind
    return model, meta
