"""A π0 / SmolVLA-shaped planner with random weights, in plain PyTorch (no hub downloads, no
transformers dependency): the shapes and the data flow are what matter to the runtime.

- prefix: a SigLIP-style vision tower (16 px patches, pre-norm ViT, GELU MLPs) whose patch
  features are projected into a Qwen2-shaped decoder (RMSNorm, rotary positions, grouped-query
  attention, SwiGLU MLPs, a 32k-row token embedding) over image + instruction tokens; its
  last hidden states are projected to the keys and values every expert layer attends to: the
  prefix's KV cache, one `features` output;
- expert: a flow-matching action expert (self-attention over the action tokens, cross-attention
  to the prefix KV, SwiGLU), taking x_t, t and the joint state, giving the velocity; the
  runtime integrates it with K Euler steps.

`make verify-vla` builds it at ~0.6 B parameters (over 2 GB in fp32: the prefix graph cannot
be one protobuf), exports, bundles and runs it (bench/verify_vla.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class VlaShape:
    image: int = 96  # square camera input, uint8 HWC
    patch: int = 16
    vision_width: int = 768
    vision_layers: int = 6
    vocab: int = 32_000
    max_len: int = 12
    hidden: int = 1024
    layers: int = 42
    heads: int = 16
    kv_heads: int = 4
    intermediate: int = 3072
    expert_width: int = 384
    expert_layers: int = 8
    expert_heads: int = 6
    horizon: int = 20
    joints: int = 6

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2 + self.max_len


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, h, Lq, d], k/v [B, h, Lk, d] -> [B, Lq, h*d] (no mask: the prefix attends both
    ways, as π0's does)."""
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = w @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, length, _ = x.shape
    return x.reshape(b, length, n, -1).transpose(1, 2)


class VisionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + self.proj(_attend(_heads(q, self.heads), _heads(k, self.heads),
                                  _heads(v, self.heads)))
        return x + self.mlp(self.ln2(x))


class Rotary(nn.Module):
    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, dim: int, positions: int, base: float = 1_000_000.0) -> None:
        super().__init__()
        inv = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
        angles = torch.outer(torch.arange(positions).float(), inv)
        emb = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", emb.cos()[None, None], persistent=False)
        self.register_buffer("sin", emb.sin()[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos + rotated * self.sin


class DecoderLayer(nn.Module):
    """Qwen2's: RMSNorm, GQA with biased q/k/v and rotary positions, SwiGLU."""

    def __init__(self, s: VlaShape, rotary: Rotary) -> None:
        super().__init__()
        d = s.hidden // s.heads
        self.s, self.rotary = s, rotary
        self.norm1, self.norm2 = RMSNorm(s.hidden), RMSNorm(s.hidden)
        self.q = nn.Linear(s.hidden, s.heads * d)
        self.k = nn.Linear(s.hidden, s.kv_heads * d)
        self.v = nn.Linear(s.hidden, s.kv_heads * d)
        self.o = nn.Linear(s.heads * d, s.hidden, bias=False)
        self.gate = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.up = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.down = nn.Linear(s.intermediate, s.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.s
        h = self.norm1(x)
        q = self.rotary(_heads(self.q(h), s.heads))
        rep = s.heads // s.kv_heads
        k = self.rotary(_heads(self.k(h), s.kv_heads)).repeat_interleave(rep, dim=1)
        v = _heads(self.v(h), s.kv_heads).repeat_interleave(rep, dim=1)
        x = x + self.o(_attend(q, k, v))
        h = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class Prefix(nn.Module):
    """image uint8 [1, S, S, 3], tokens int64 [1, max_len] -> kv [1, 2*expert_layers, T, E]."""

    def __init__(self, s: VlaShape) -> None:
        super().__init__()
        self.s = s
        n_patches = (s.image // s.patch) ** 2
        self.patch = nn.Conv2d(3, s.vision_width, s.patch, stride=s.patch)
        self.pos = nn.Parameter(torch.randn(1, n_patches, s.vision_width) * 0.02)
        self.vision = nn.ModuleList(VisionBlock(s.vision_width, 12)
                                    for _ in range(s.vision_layers))
        self.vision_norm = nn.LayerNorm(s.vision_width)
        self.project = nn.Linear(s.vision_width, s.hidden)
        self.embed = nn.Embedding(s.vocab, s.hidden)
        rotary = Rotary(s.hidden // s.heads, s.tokens)
        self.layers = nn.ModuleList(DecoderLayer(s, rotary) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden)
        self.kv = nn.Linear(s.hidden, 2 * s.expert_layers * s.expert_width, bias=False)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        s = self.s
        x = image.permute(0, 3, 1, 2).float() * (2.0 / 255.0) - 1.0
        p = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.vision:
            p = block(p)
        h = torch.cat([self.project(self.vision_norm(p)), self.embed(tokens)], dim=1)
        for layer in self.layers:
            h = layer(h)
        kv = self.kv(self.norm(h))  # [1, T, 2 * layers * E]
        return kv.reshape(1, s.tokens, 2 * s.expert_layers, s.expert_width).transpose(1, 2)


class ExpertLayer(nn.Module):
    def __init__(self, s: VlaShape) -> None:
        super().__init__()
        w, self.heads = s.expert_width, s.expert_heads
        self.norm1, self.norm2, self.norm3 = RMSNorm(w), RMSNorm(w), RMSNorm(w)
        self.qkv = nn.Linear(w, 3 * w, bias=False)
        self.o = nn.Linear(w, w, bias=False)
        self.cq = nn.Linear(w, w, bias=False)
        self.co = nn.Linear(w, w, bias=False)
        self.gate = nn.Linear(w, 4 * w, bias=False)
        self.up = nn.Linear(w, 4 * w, bias=False)
        self.down = nn.Linear(4 * w, w, bias=False)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = self.heads
        q, sk, sv = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.o(_attend(_heads(q, n), _heads(sk, n), _heads(sv, n)))
        x = x + self.co(_attend(_heads(self.cq(self.norm2(x)), n), _heads(k, n),
                                _heads(v, n)))
        h = self.norm3(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class Expert(nn.Module):
    """kv (the prefix's), x_t [1, H, D], t [1], q [1, D] -> velocity [1, H, D]."""

    freqs: torch.Tensor

    def __init__(self, s: VlaShape) -> None:
        super().__init__()
        self.s = s
        w = s.expert_width
        self.action_in = nn.Linear(s.joints, w)
        self.state_in = nn.Linear(s.joints, w)
        self.time = nn.Sequential(nn.Linear(64, w), nn.SiLU(), nn.Linear(w, w))
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(32) / 32),
                             persistent=False)
        self.pos = nn.Parameter(torch.randn(1, s.horizon, w) * 0.02)
        self.layers = nn.ModuleList(ExpertLayer(s) for _ in range(s.expert_layers))
        self.norm = RMSNorm(w)
        self.action_out = nn.Linear(w, s.joints)

    def forward(self, kv: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                q: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.freqs[None] * 1000.0
        temb = self.time(torch.cat([angles.sin(), angles.cos()], dim=-1))
        x = self.action_in(x_t) + self.pos + (temb + self.state_in(q))[:, None, :]
        for i, layer in enumerate(self.layers):
            x = layer(x, kv[:, 2 * i], kv[:, 2 * i + 1])
        return self.action_out(self.norm(x))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def modules(shape: VlaShape | None = None, seed: int = 0) -> dict[str, nn.Module]:
    """`duet export --module bench.vla_model:modules` works too (random weights, seeded)."""
    s = shape or VlaShape()
    torch.manual_seed(seed)
    with torch.no_grad():
        prefix, expert = Prefix(s).eval(), Expert(s).eval()
        small_init(prefix, expert)
        expert.action_out.weight.mul_(0.1)  # a calm random field
    return {"prefix": prefix, "expert": expert}


JOINTS = ["base_yaw", "shoulder", "elbow", "wrist_pitch", "wrist_roll", "gripper"]


def small_init(*modules: nn.Module) -> None:
    """A small random init of every matrix, as a trained model's scale (inside no_grad)."""
    for m in modules:
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)


def observation_inputs(image: int, max_len: int) -> list[dict[str, object]]:
    """The first stage's inputs: the scene camera and the instruction's tokens."""
    return [{"role": "camera", "name": "image", "camera": "scene", "height": image,
             "width": image},
            {"role": "instruction", "name": "tokens", "tokenizer": "tokenizer.json",
             "max_len": max_len}]


def contract(s: VlaShape, dt_s: float, flow_steps: int = 10) -> dict[str, object]:
    joints = list(JOINTS)
    return {
        "rates": {"planner_hz": 1.0, "follower_hz": 500.0},
        "planner": {
            "stages": [
                {"name": "prefix", "file": "prefix.onnx",
                 "inputs": observation_inputs(s.image, s.max_len),
                 "outputs": [{"role": "features", "name": "kv", "shape": [
                     1, 2 * s.expert_layers, s.tokens, s.expert_width]}]},
                {"name": "expert", "file": "expert.onnx", "flow": {"steps": flow_steps},
                 "inputs": [
                     {"role": "stage", "name": "kv", "source": "prefix.kv"},
                     {"role": "noise", "name": "x_t"},
                     {"role": "flow_time", "name": "t"},
                     {"role": "proprio", "name": "q", "field": "q"}],
                 "outputs": [{"role": "velocity", "name": "v"}]}],
            # deltas from the observed q, 0.02 rad per unit: a random field moves the arm
            # by a few hundredths of a radian, safely
            "actions": {"horizon": s.horizon, "dt_s": dt_s, "kind": "delta",
                        "joints": joints, "mean": [0.0] * 6, "std": [0.02] * 6}},
    }
