"""A π0-FAST / OpenVLA-shaped planner with random weights, in plain PyTorch: action tokens
decoded autoregressively by the language model itself, over a fixed-size KV buffer.

- prefill: a SigLIP-style vision tower (bench/vla_model.py's blocks) whose patch features are
  projected into a Qwen2-shaped decoder over image + instruction tokens (both ways, as π0's
  prefix); each layer's keys and values are written into one KV buffer
  [1, layers, 2, kv_heads, positions, head_dim] at positions 0..prefix-1, zeros after;
- decode: the same decoder (the same weights) run on one token at a time: the token and its
  position in, this step's keys and values written into the buffer at the position (a one-hot
  blend, so every shape stays static, as engines on a robot need), causal attention over the
  buffer, the tied-embedding logits and the greedy next token out. The runtime's loop stage
  feeds the buffer and the token back (tests/byo_policies.py's tiny one, at size).

The decoder has Qwen2-0.5B's widths (transformers' `Qwen2Config` fields: hidden_size 896,
intermediate_size 4864, 14 attention / 2 key-value heads, rope_theta 1e6, tied embeddings)
with 8 of its 24 layers and a 32k vocabulary; the vision tower SigLIP-so400m's width (1152)
with 10 layers: `transformers` is not a dependency, so the shapes are taken, not the classes.
The decoder is cut so that a plan (one decoder pass per token) fits a 10 s chunk on one CPU
thread; the parameters are in the tower, which runs once a plan.

Actions: FAST tokens (π0-FAST: a DCT per joint, BPE over the rounded coefficients; the
tokenizer is fitted here on smooth random chunks and ships in the bundle), the last ids of the
vocabulary; 20 tokens a chunk instead of the 120 that bins per joint and step would take.
Decoding is constrained as a grammar would (FAST tokens for the chunk's tokens, then the end
token): random logits otherwise end or run on anywhere.

The two graphs each hold the decoder's weights (ONNX graphs cannot share an initializer
across files): the bundle stores them twice; the process holds one copy per engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.vla_model import (
    JOINTS,
    RMSNorm,
    VisionBlock,
    _attend,
    _heads,
    observation_inputs,
    small_init,
)

END, ACT = 1, 2  # the end token; the token that opens the action sequence (the first input)
FAST_FILE = "fast.json"  # the FAST tokenizer, in the bundle


@dataclass(frozen=True)
class ArShape:
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 8
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    vocab_size: int = 32_000
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    image: int = 96
    patch: int = 16
    vision_width: int = 1152
    vision_layers: int = 10
    max_len: int = 12  # instruction tokens
    horizon: int = 20
    joints: int = 6
    fast_vocab: int = 1024  # the BPE's tokens, the last ids of the vocabulary
    fast_scale: float = 100.0  # DCT coefficients x this, rounded (rad deltas)
    tokens: int = 20  # action tokens a chunk (the end token after them)
    amplitude: float = 0.02  # rad: the smooth chunks the BPE is fitted on

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def prefix(self) -> int:
        return (self.image // self.patch) ** 2 + self.max_len

    @property
    def positions(self) -> int:
        """The KV buffer's length: the prefix, the opening token and every action token."""
        return self.prefix + 1 + self.tokens

    @property
    def kv(self) -> list[int]:
        s = self
        return [1, s.num_hidden_layers, 2, s.num_key_value_heads, s.positions, s.head_dim]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Layer(nn.Module):
    """Qwen2's decoder layer: RMSNorm, grouped-query attention with biased q/k/v and rotary
    positions, SwiGLU; `prefix` over many positions, `step` over one."""

    def __init__(self, s: ArShape) -> None:
        super().__init__()
        d, self.s = s.head_dim, s
        self.norm1 = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.norm2 = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.q = nn.Linear(s.hidden_size, s.num_attention_heads * d)
        self.k = nn.Linear(s.hidden_size, s.num_key_value_heads * d)
        self.v = nn.Linear(s.hidden_size, s.num_key_value_heads * d)
        self.o = nn.Linear(s.num_attention_heads * d, s.hidden_size, bias=False)
        self.gate = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, h = self.s, self.norm1(x)
        return (_rotate(_heads(self.q(h), s.num_attention_heads), cos, sin),
                _rotate(_heads(self.k(h), s.num_key_value_heads), cos, sin),
                _heads(self.v(h), s.num_key_value_heads))

    def prefix(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self._qkv(x, cos, sin)
        rep = self.s.num_attention_heads // self.s.num_key_value_heads
        x = x + self.o(_attend(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
        return self._mlp(x), k, v

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
             here: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys/values [1, kv_heads, T, d]; `here` [T, 1]: 1 at the position; `hidden`
        [T]: -inf after it."""
        q, k, v = self._qkv(x, cos, sin)
        keys = keys * (1 - here) + here * k
        values = values * (1 - here) + here * v
        rep = self.s.num_attention_heads // self.s.num_key_value_heads
        w = q @ keys.repeat_interleave(rep, 1).transpose(-1, -2) / self.s.head_dim ** 0.5
        w = torch.softmax(w + hidden, dim=-1)
        out = (w @ values.repeat_interleave(rep, 1)).transpose(1, 2).reshape(1, 1, -1)
        return self._mlp(x + self.o(out)), keys, values


class Decoder(nn.Module):
    """The language model's weights: token embedding (tied to the logits), layers, norm."""

    cos: torch.Tensor
    sin: torch.Tensor
    layers: nn.ModuleList  # of Layer

    def __init__(self, s: ArShape) -> None:
        super().__init__()
        self.s = s
        self.embed = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.num_hidden_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        d = s.head_dim
        inv = 1.0 / s.rope_theta ** (torch.arange(0, d, 2).float() / d)
        angles = torch.outer(torch.arange(s.positions).float(), inv)
        emb = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)


class Prefill(nn.Module):
    """image uint8 [1, S, S, 3], tokens int64 [1, max_len] -> the KV buffer."""

    decoder: Decoder

    def __init__(self, s: ArShape, decoder: Decoder) -> None:
        super().__init__()
        self.s, self.decoder = s, decoder
        n_patches = (s.image // s.patch) ** 2
        self.patch = nn.Conv2d(3, s.vision_width, s.patch, stride=s.patch)
        self.pos = nn.Parameter(torch.randn(1, n_patches, s.vision_width) * 0.02)
        self.vision = nn.ModuleList(VisionBlock(s.vision_width, 12)
                                    for _ in range(s.vision_layers))
        self.vision_norm = nn.LayerNorm(s.vision_width)
        self.project = nn.Linear(s.vision_width, s.hidden_size)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        s, dec = self.s, self.decoder
        x = image.permute(0, 3, 1, 2).float() * (2.0 / 255.0) - 1.0
        p = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.vision:
            p = block(p)
        h = torch.cat([self.project(self.vision_norm(p)), dec.embed(tokens)], dim=1)
        cos, sin = dec.cos[:s.prefix], dec.sin[:s.prefix]
        layers = []
        for layer in dec.layers:
            assert isinstance(layer, Layer)
            h, k, v = layer.prefix(h, cos, sin)
            layers.append(torch.stack([k, v], 1))  # [1, 2, kv_heads, prefix, d]
        kv = torch.stack(layers, 1)
        pad = kv.new_zeros(*kv.shape[:4], s.positions - s.prefix, kv.shape[-1])
        return torch.cat([kv, pad], dim=4)


class DecodeStep(nn.Module):
    """kv_in (the buffer), tok_in int64 [1, 1], pos int64 [1] -> token int64 [1, 1], kv_out."""

    decoder: Decoder
    fast: torch.Tensor
    done: torch.Tensor
    slots: torch.Tensor

    def __init__(self, s: ArShape, decoder: Decoder, fast_vocab: int) -> None:
        super().__init__()
        self.s, self.decoder = s, decoder
        # the grammar: FAST tokens while the chunk's are due, then the end token
        fast, done = torch.full((s.vocab_size,), -1e9), torch.full((s.vocab_size,), -1e9)
        fast[s.vocab_size - fast_vocab:] = 0.0
        done[END] = 0.0
        self.register_buffer("fast", fast, persistent=False)
        self.register_buffer("done", done, persistent=False)
        self.register_buffer("slots", torch.arange(s.positions), persistent=False)

    def forward(self, kv_in: torch.Tensor, tok_in: torch.Tensor, pos: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        s, dec = self.s, self.decoder
        x = dec.embed(tok_in)  # [1, 1, hidden]
        cos, sin = dec.cos[pos][:, None], dec.sin[pos][:, None]  # [1, 1, d]: per head
        here = (self.slots == pos).float()[:, None]
        hidden = torch.where(self.slots <= pos, 0.0, -1e9)
        layers = []
        for i, layer in enumerate(dec.layers):
            assert isinstance(layer, Layer)
            x, k, v = layer.step(x, kv_in[:, i, 0], kv_in[:, i, 1], here, hidden, cos, sin)
            layers.append(torch.stack([k, v], 1))
        logits = dec.norm(x)[:, 0] @ dec.embed.weight.t()  # [1, vocab]
        over = (pos >= s.prefix + s.tokens).float()[:, None]
        logits = logits + over * self.done + (1 - over) * self.fast
        return logits.argmax(-1, keepdim=True), torch.stack(layers, 1)


def fast_tokenizer(s: ArShape, path: Path, seed: int = 0) -> tuple[int, int]:
    """FAST's BPE fitted on smooth random chunks (a few cosines per joint, within
    ±amplitude), saved at `path`: (min_symbol, the BPE's vocabulary size)."""
    from tokenizers import Tokenizer

    from runtime.model.detokenizer import train_fast_bpe

    rng = np.random.default_rng(seed)
    t = (np.arange(s.horizon) + 0.5) / s.horizon
    basis = np.cos(np.pi * np.arange(4)[:, None] * t[None])  # [4, H]
    amp = rng.uniform(-1, 1, (2048, 4, s.joints)) * s.amplitude / (1 + np.arange(4))[:, None]
    chunks = np.einsum("kh,nkd->nhd", basis, amp) / 2
    low = train_fast_bpe(chunks, s.fast_scale, s.fast_vocab, path)
    return low, Tokenizer.from_file(str(path)).get_vocab_size()


def modules(shape: ArShape | None = None, seed: int = 0, fast_vocab: int | None = None
            ) -> dict[str, nn.Module]:
    """Random weights, seeded; `fast_vocab`: the FAST tokenizer's size (fast_tokenizer)."""
    s = shape or ArShape()
    torch.manual_seed(seed)
    with torch.no_grad():
        decoder = Decoder(s)
        prefill = Prefill(s, decoder).eval()
        small_init(prefill)
    return {"prefill": prefill,
            "decode": DecodeStep(s, decoder, fast_vocab or s.fast_vocab).eval()}


def contract(s: ArShape, dt_s: float, min_symbol: int, fast_vocab: int) -> dict[str, object]:
    joints = list(JOINTS)
    return {
        "rates": {"planner_hz": 1.0, "follower_hz": 500.0},
        "planner": {
            "stages": [
                {"name": "prefill", "file": "prefill.onnx",
                 "inputs": observation_inputs(s.image, s.max_len),
                 "outputs": [{"role": "features", "name": "kv0", "shape": s.kv}]},
                {"name": "decode", "file": "decode.onnx",
                 "loop": {"max_steps": s.tokens + 1, "end_token": END, "detokenizer": {
                     "kind": "fast", "tokenizer": FAST_FILE, "scale": s.fast_scale,
                     "min_symbol": min_symbol, "token_offset": s.vocab_size - fast_vocab}},
                 "inputs": [
                     {"role": "carry", "name": "kv_in", "output": "kv_out",
                      "source": "prefill.kv0"},
                     {"role": "carry", "name": "tok_in", "output": "token", "fill": ACT},
                     {"role": "position", "name": "pos", "start": s.prefix}],
                 "outputs": [{"role": "token", "name": "token"},
                             {"role": "features", "name": "kv_out", "shape": s.kv}]}],
            # deltas from the observed q: FAST's coefficients span what it was fitted on, so
            # random tokens move the arm by a few hundredths of a radian
            "actions": {"horizon": s.horizon, "dt_s": dt_s, "kind": "delta",
                        "joints": joints}},
    }
