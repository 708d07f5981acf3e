"""FACT, the flow-matching action tokenizer of the GenieReasoner seed, sized for duet's chunks.

An action chunk (H waypoints x J joints, as deltas from the observed q, normalised per joint)
becomes `code_len` codes of `code_bits` bits each, and comes back through a flow-matching
decoder:

- encoder: an MLP (the seed uses an MM-DiT; a 60-value chunk needs no attention and 2 CPU
  cores cannot afford one) maps the chunk to a latent; the quantizer turns it into L codes
  of B bits with no codebook (a vocabulary of 2**B per code), straight-through gradient:
  "gray" (default) cuts one latent per code into 2**B levels written as a Gray code,
  "lfq" (MAGVIT-v2) keeps the sign of one latent per bit (see `FactTokenizer`);
- decoder: a rectified flow from standard Gaussian noise (t = 0) to the chunk (t = 1),
  x_t = (1 - t) * noise + t * x1, conditioned on the codes. The network predicts the clean
  chunk x1 and the velocity is (x1_hat - x_t) / (1 - t), the field whose Euler steps the
  runtime integrates: one step already lands on x1_hat, more steps refine it.

Training: flow-matching loss on x1 (the velocity loss weighted by (1 - t)^2) through the
straight-through quantizer, a commitment loss pulling latents to their quantized values and,
for LFQ, a balance loss keeping every bit in use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from policy.train import Log, fit, seed_everything

TIME_FREQS = 6  # sin/cos of t * pi * 2^k, k < TIME_FREQS
MIN_ONE_MINUS_T = 1e-2  # the velocity's 1 / (1 - t), bounded near t = 1


class ResidualMLP(nn.Module):
    """Linear in, pre-norm residual blocks (LayerNorm, Linear, GELU, Linear), Linear out."""

    def __init__(self, d_in: int, d_out: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(),
                          nn.Linear(hidden, hidden)) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(self.norm(h))


def bits_of(latent: torch.Tensor) -> torch.Tensor:
    """Lookup-free quantization: +1 where latent >= 0, else -1 (float)."""
    return torch.where(latent >= 0, 1.0, -1.0)


def gray_bits(z: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalars z [...] in (-1, 1) -> (the centre of their level among 2**bits equal levels
    [...], that level's Gray code as +-1 bits [..., bits], most significant first)."""
    levels = 2 ** bits
    index = ((z + 1.0) * (levels / 2)).floor().clamp(0, levels - 1)
    centre = (2.0 * index + 1.0) / levels - 1.0
    binary = [(index / 2 ** (bits - 1 - k)).floor().remainder(2) for k in range(bits)]
    # Gray bit k = binary bit k XOR binary bit k-1; with bits as +-1, XOR is a product.
    pm = [1.0 - 2.0 * b for b in binary]
    gray = [pm[0]] + [pm[k] * pm[k - 1] for k in range(1, bits)]
    return centre, torch.stack(gray, dim=-1)


def gray_value(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of `gray_bits`: +-1 Gray bits [..., bits] -> level centres [...] in (-1, 1)."""
    bits = codes.shape[-1]
    value = torch.zeros_like(codes[..., 0])
    binary = torch.ones_like(codes[..., 0])
    for k in range(bits):
        binary = binary * codes[..., k]  # +-1 binary bit k = XOR of Gray bits 0..k
        value = value + (1.0 - binary) / 2 * 2.0 ** (bits - k)
    return (value + 1.0) / 2 ** bits - 1.0


def time_features(t: torch.Tensor) -> torch.Tensor:
    """t [B] -> [B, 2*TIME_FREQS] sinusoidal features."""
    freqs = math.pi * 2.0 ** torch.arange(TIME_FREQS, dtype=t.dtype, device=t.device)
    angle = t[:, None] * freqs
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


QUANTIZERS = ("gray", "lfq")


class FactTokenizer(nn.Module):
    """Chunk deltas [B,H,J] (rad) <-> codes [B,L,Bits] of +-1.

    quantizer "lfq": MAGVIT-v2's lookup-free quantization, one latent per bit (its sign);
    "gray": one latent per code, cut into 2**Bits equal levels in (-1, 1) and written as the
    level's Gray code (still lookup-free and bitwise; neighbouring levels differ by one bit,
    so a bit wrong near a boundary moves the value by one level). The decoder reads LFQ bits
    as they are and Gray bits as their level values.
    """

    kind: ClassVar[str] = "fact_tokenizer"
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, horizon: int = 10, n_joints: int = 6, code_len: int = 20,
                 code_bits: int = 6, quantizer: str = "gray", hidden: int = 256,
                 encoder_blocks: int = 2, decoder_blocks: int = 3) -> None:
        super().__init__()
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        self.kwargs: dict[str, Any] = {
            "horizon": horizon, "n_joints": n_joints, "code_len": code_len,
            "code_bits": code_bits, "quantizer": quantizer, "hidden": hidden,
            "encoder_blocks": encoder_blocks, "decoder_blocks": decoder_blocks}
        self.horizon, self.n_joints = horizon, n_joints
        self.code_len, self.code_bits, self.quantizer = code_len, code_bits, quantizer
        chunk = horizon * n_joints
        latents = code_len * code_bits if quantizer == "lfq" else code_len
        self.encoder = ResidualMLP(chunk, latents, hidden, encoder_blocks)
        self.decoder = ResidualMLP(latents + chunk + 2 * TIME_FREQS, chunk, hidden,
                                   decoder_blocks)
        # Per-joint statistics of the deltas (set by `set_normalisation`); the runtime
        # de-normalises the integrated x with them: delta = x * std + mean.
        self.register_buffer("mean", torch.zeros(n_joints))
        self.register_buffer("std", torch.ones(n_joints))

    @property
    def total_bits(self) -> int:
        return self.code_len * self.code_bits

    def set_normalisation(self, deltas: torch.Tensor) -> None:
        flat = deltas.reshape(-1, self.n_joints)
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0).clamp_min(1e-4))

    def normalise(self, delta: torch.Tensor) -> torch.Tensor:
        return (delta - self.mean) / self.std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def latent(self, delta: torch.Tensor) -> torch.Tensor:
        """Chunk deltas [B,H,J] (rad) -> continuous latent: [B,L,Bits] (lfq) or [B,L] in
        (-1, 1) (gray)."""
        b = delta.shape[0]
        z = self.encoder(self.normalise(delta).reshape(b, -1))
        if self.quantizer == "lfq":
            return z.reshape(b, self.code_len, self.code_bits)
        return torch.tanh(z)

    def quantize(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent -> (codes [B,L,Bits] of +-1, the quantized latent the decoder reads)."""
        if self.quantizer == "lfq":
            codes = bits_of(latent)
            return codes, codes
        centre, codes = gray_bits(latent, self.code_bits)
        return codes, centre

    def condition(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B,L,Bits] -> the decoder's conditioning [B, latents]."""
        if self.quantizer == "lfq":
            return codes.reshape(codes.shape[0], -1)
        return gray_value(codes)

    @torch.no_grad()
    def encode(self, delta: torch.Tensor) -> torch.Tensor:
        """Chunk deltas [B,H,J] (rad) -> codes [B,L,Bits] of +-1."""
        return self.quantize(self.latent(delta))[0]

    def predict_clean(self, codes: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                      condition: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder network: (codes [B,L,Bits], x_t [B,H,J], t [B]) -> x1_hat [B,H,J].
        `condition` replaces `condition(codes)` (training: the straight-through latent)."""
        b = codes.shape[0]
        cond = self.condition(codes) if condition is None else condition
        inp = torch.cat([cond, x_t.reshape(b, -1), time_features(t)], dim=1)
        return self.decoder(inp).reshape(b, self.horizon, self.n_joints)

    def velocity(self, codes: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                 ) -> torch.Tensor:
        """Rectified-flow velocity at (x_t, t) in the normalised space."""
        x1 = self.predict_clean(codes, x_t, t)
        return (x1 - x_t) / (1.0 - t).clamp_min(MIN_ONE_MINUS_T)[:, None, None]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, steps: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Codes -> chunk deltas (rad): `steps` Euler steps from Gaussian noise, exactly
        the runtime's loop (x += velocity / K at t = k / K)."""
        b = codes.shape[0]
        x = torch.randn(b, self.horizon, self.n_joints, generator=generator)
        for k in range(steps):
            t = torch.full((b,), k / steps)
            x = x + self.velocity(codes, x, t) / steps
        return self.denormalise(x)

    def loss(self, delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Flow matching (x1-prediction) + commitment (+ bit balance for lfq) on a batch of
        deltas."""
        latent = self.latent(delta)
        codes, hard = self.quantize(latent)
        seen = self.condition(codes)
        flat = latent.reshape(seen.shape)
        cond = flat + (seen - flat).detach()  # straight-through
        x1 = self.normalise(delta)
        t = torch.rand(delta.shape[0], generator=generator)
        noise = torch.randn(x1.shape, generator=generator)
        x_t = (1.0 - t)[:, None, None] * noise + t[:, None, None] * x1
        total = (F.mse_loss(self.predict_clean(codes, x_t, t, cond), x1)
                 + 0.05 * (latent - hard).pow(2).mean())
        if self.quantizer == "lfq":
            total = total + 0.1 * hard.mean(0).pow(2).mean()
        return total


class FactDecoderStage(nn.Module):
    """Stage 2 of the FACT planner as the runtime runs it K times:
    (codes [1,L,Bits], x_t [1,H,J], t [1]) -> velocity [1,H,J], normalised space."""

    def __init__(self, tokenizer: FactTokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, codes: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.velocity(codes, x_t, t)


def train_tokenizer(deltas: np.ndarray, steps: int, seed: int, batch: int = 512,
                    lr: float = 1e-3, log: Log = print, **model_kwargs: Any) -> FactTokenizer:
    """Fit a tokenizer on chunk deltas [N,H,J] (rad) from a fixed seed."""
    seed_everything(seed)
    data = torch.as_tensor(deltas, dtype=torch.float32)
    model = FactTokenizer(horizon=data.shape[1], n_joints=data.shape[2], **model_kwargs)
    model.set_normalisation(data)
    gen = torch.Generator().manual_seed(seed)
    fit(model, {"delta": data}, np.arange(len(data)), np.arange(0),
        lambda b: model.loss(b["delta"], gen), steps, batch, lr, seed, torch.device("cpu"),
        log, f"fact tokenizer L={model.code_len} B={model.code_bits}")
    return model.eval()


def reconstruction_error(roundtrip: Callable[[np.ndarray], np.ndarray], deltas: np.ndarray
                         ) -> dict[str, float]:
    """RMSE and MAE (rad) of a round trip over chunks [N,H,J], and the last waypoint's MAE."""
    err = roundtrip(deltas) - deltas
    return {"rmse_rad": float(np.sqrt(np.mean(err ** 2))), "mae_rad": float(np.abs(err).mean()),
            "mae_last_rad": float(np.abs(err[:, -1]).mean())}


def fact_roundtrip(model: FactTokenizer, steps: int, seed: int = 0
                   ) -> Callable[[np.ndarray], np.ndarray]:
    """encode -> decode with `steps` Euler steps (noise from `seed`), in batches."""
    def run(deltas: np.ndarray) -> np.ndarray:
        gen = torch.Generator().manual_seed(seed)
        out = []
        for start in range(0, len(deltas), 4096):
            x = torch.as_tensor(deltas[start:start + 4096], dtype=torch.float32)
            out.append(model.decode(model.encode(x), steps, gen).numpy())
        return np.concatenate(out)
    return run
