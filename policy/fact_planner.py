"""The FACT planner: the reference planner's perception and grounding, predicting FACT codes.

`FactPlanner` is the reference `Planner` (colour keypoints, the grounding transformer, the
action MLP on (q, next target)) with a code head: a small causal transformer built from the
same `EncoderLayer` that reads the action MLP's features as a state token, then the action
prefix (the waypoints that will execute while it thinks), then predicts the chunk's FACT codes
one code at a time, each code's bits together (greedy: a bit is the sign of its logit).

Stage 1 of the exported planner is `forward`, the autoregressive loop unrolled over the code
length with a key/value cache, so a traced graph has static shapes:

    (image uint8 [1,96,96,3], tokens int64 [1,16], q [1,6], prefix [1,P,6] (absolute rad,
     zero beyond prefix_len), prefix_len int64 [1]) -> codes float32 [1,L,Bits] of +-1

Stage 2 is `policy.fact.FactDecoderStage`. The continuous head of `Planner` (`act`) stays as
an auxiliary loss that teaches the action MLP its features; it is not in the exported graph.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import nn

from policy.models import EncoderLayer, Planner

NEG = -1e4  # additive attention mask (finite: fp16-safe)


class FactPlanner(Planner):
    """(image, tokens, q, action prefix) -> FACT codes [B,L,Bits]."""

    kind: ClassVar[str] = "fact_planner"
    code_mask: torch.Tensor

    def __init__(self, vocab_size: int, code_len: int = 20, code_bits: int = 6,
                 prefix_max: int = 5, code_dim: int = 128, code_layers: int = 2,
                 code_heads: int = 4, **planner_kwargs: Any) -> None:
        super().__init__(vocab_size, **planner_kwargs)
        if not 1 <= prefix_max < self.horizon:
            raise ValueError(f"prefix_max must be in [1, horizon={self.horizon}), got "
                             f"{prefix_max} (prefix_len 0 plans without a prefix)")
        self.kwargs.update({"code_len": code_len, "code_bits": code_bits,
                            "prefix_max": prefix_max, "code_dim": code_dim,
                            "code_layers": code_layers, "code_heads": code_heads})
        self.code_len, self.code_bits, self.prefix_max = code_len, code_bits, prefix_max
        hidden = self.head.in_features
        self.state_token = nn.Linear(hidden, code_dim)
        self.prefix_embed = nn.Linear(self.n_joints, code_dim)
        self.prefix_pad = nn.Parameter(torch.zeros(code_dim))
        self.prefix_pos = nn.Parameter(torch.randn(prefix_max, code_dim) * 0.02)
        self.bos = nn.Parameter(torch.randn(code_dim) * 0.02)
        self.code_embed = nn.Linear(code_bits, code_dim)
        self.code_pos = nn.Parameter(torch.randn(code_len, code_dim) * 0.02)
        self.code_layers = nn.ModuleList(EncoderLayer(code_dim, code_heads)
                                         for _ in range(code_layers))
        self._layers = [cast(EncoderLayer, m) for m in self.code_layers]
        self.code_norm = nn.LayerNorm(code_dim)
        self.bits_head = nn.Linear(code_dim, code_bits)
        # Context (state + prefix) sees itself only; code slot i sees the context and the
        # slots up to i (slot i holds BOS or code i-1, its output predicts code i).
        c, n = self.context_len, self.context_len + code_len
        allowed = torch.zeros(n, n, dtype=torch.bool)
        allowed[:, :c] = True
        allowed[c:, c:] = torch.tril(torch.ones(code_len, code_len, dtype=torch.bool))
        self.register_buffer("code_mask", torch.where(allowed, 0.0, NEG))
        self.perception_frozen = False

    def freeze_perception(self) -> None:
        """Keep keypoints and grounding as they are (weights and BatchNorm statistics)."""
        self.perception_frozen = True
        for module in (self.vision, self.grounding):
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> FactPlanner:
        super().train(mode)
        if self.perception_frozen:
            self.vision.eval()
            self.grounding.eval()
        return self

    @property
    def context_len(self) -> int:
        return 1 + self.prefix_max

    def context(self, features: torch.Tensor, q: torch.Tensor, prefix: torch.Tensor,
                prefix_len: torch.Tensor) -> torch.Tensor:
        """State token + prefix tokens [B, 1+P, D]. Prefix waypoints at index >= prefix_len
        become the pad token whatever their values (inf/nan included)."""
        p = self.prefix_max
        valid = torch.arange(p, device=q.device)[None, :] < prefix_len[:, None]  # [B,P]
        rel = (prefix - q[:, None, :]) / self.delta_std[:p]
        rel = torch.where(valid[..., None], rel, torch.zeros_like(rel))
        gate = valid[..., None].float()
        prefix_tokens = (gate * self.prefix_embed(rel) + (1.0 - gate) * self.prefix_pad
                         + self.prefix_pos)
        return torch.cat([self.state_token(features)[:, None], prefix_tokens], dim=1)

    def code_logits(self, context: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: context [B,C,D], target codes [B,L,Bits] -> bit logits."""
        b = context.shape[0]
        slots = torch.cat([self.bos.expand(b, 1, -1), self.code_embed(codes[:, :-1])], dim=1)
        x = torch.cat([context, slots + self.code_pos], dim=1)
        for layer in self._layers:
            x = layer(x, self.code_mask)
        return self.bits_head(self.code_norm(x[:, self.context_len:]))

    def greedy_codes(self, context: torch.Tensor) -> torch.Tensor:
        """Autoregressive greedy decoding with a key/value cache: codes [B,L,Bits] of +-1."""
        b = context.shape[0]
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        x = context
        for layer in self._layers:
            x, kv = layer.step(x)
            cache.append(kv)
        slot = self.bos.expand(b, 1, -1)
        codes = []
        for i in range(self.code_len):
            x = slot + self.code_pos[i]
            for j, layer in enumerate(self._layers):
                x, cache[j] = layer.step(x, past=cache[j])
            code = torch.where(self.bits_head(self.code_norm(x)) >= 0, 1.0, -1.0)
            codes.append(code)
            slot = self.code_embed(code)
        return torch.cat(codes, dim=1)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor,  # type: ignore[override]
                q: torch.Tensor, prefix: torch.Tensor, prefix_len: torch.Tensor
                ) -> torch.Tensor:
        target = self.perceive(image, tokens)["target_xy"]
        return self.greedy_codes(self.context(self.features(target, q), q, prefix,
                                              prefix_len))

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """Contract-shaped stage-1 inputs (export tracing and tests)."""
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, 256, (batch, 96, 96, 3), dtype=torch.uint8, generator=g),
                torch.zeros(batch, self.max_tokens, dtype=torch.int64),
                torch.zeros(batch, self.n_joints),
                torch.zeros(batch, self.prefix_max, self.n_joints),
                torch.zeros(batch, dtype=torch.int64))
