"""Followers for a robot of your own, from its identification (runtime/follower/identification.py)
and its tracking recordings, with the contract's follower interface (reference window, q, dq)
-> residual, so any of them ships in a bundle and runs in the one follower core.

- `ModelFreeFollower`: the identified servo model inverted: the command that makes the servo
  arrive at the reference, u(t) = r(t+d) + a r'' + b r' + c tanh(r'/EPS) + G(r), all at t+d,
  with r, r', r'' from a quadratic through the first points of the look-ahead window, and G
  from the description's gravity where the model was fitted with it (no network either way).
- `LearnedFollower`: the model-free follower plus a bounded correction network
  (policy.models.Follower) trained on the robot's own tracking data by hindsight: whatever
  the arm actually did in the next look-ahead span is a reference the command it was given
  tracks perfectly, so (measured future, q, dq) -> command is supervised by measurement alone,
  whatever references produced the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from policy.models import Follower
from runtime.follower.identification import EPS, ServoModel, Track

FIT_POINTS = 4  # window points the quadratic goes through (the first 80 ms at 20 ms spacing)


def _chain_angles(q: torch.Tensor) -> torch.Tensor:
    c = torch.cat([torch.zeros_like(q[:, :1]), torch.cumsum(q, dim=1)], dim=1)
    j = q.shape[1]
    return torch.stack([c[:, k + 1] - c[:, i] for i in range(j) for k in range(i, j)], dim=1)


class ModelFreeFollower(nn.Module):
    kind = "model-free"
    pos_at_d: torch.Tensor
    vel_at_d: torch.Tensor
    acc_at_d: torch.Tensor
    pos_at_tick: torch.Tensor
    abc: torch.Tensor
    gravity: torch.Tensor

    def __init__(self, model: ServoModel, lookahead: int = 8, lookahead_dt: float = 0.02
                 ) -> None:
        super().__init__()
        self.lookahead = lookahead
        n = len(model.fits)
        taus = (np.arange(FIT_POINTS) + 1.0) * lookahead_dt
        basis = np.stack([np.ones_like(taus), taus, taus * taus], axis=1)  # [P, 3]
        pinv = np.linalg.pinv(basis)  # [3, P]: coefficients of the quadratic from P points

        def rows(vec: Any) -> np.ndarray:  # [J, 3] evaluation vectors -> [J, P] weights
            return np.asarray(vec) @ pinv

        d = np.array([f.delay_s for f in model.fits])
        one, zero = np.ones(n), np.zeros(n)
        self.register_buffer("pos_at_d", _t(rows(np.stack([one, d, d * d], 1))))
        self.register_buffer("vel_at_d", _t(rows(np.stack([zero, one, 2 * d], 1))))
        self.register_buffer("acc_at_d", _t(rows(np.stack([zero, zero, 2 * one], 1))))
        tick = model.tick_s
        self.register_buffer("pos_at_tick", _t(rows(np.stack([one, tick * one, tick**2 * one],
                                                             1))))
        self.register_buffer("abc", _t(np.array([[f.a, f.b, f.c] for f in model.fits])))
        # the description's gravity (k + s tau(r) per joint), or the free trig fit's weights
        self.chain = model.chain
        self.register_buffer("gravity", _t(np.array([f.gravity for f in model.fits]).T))

    def _at(self, weights: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return (ref[:, :FIT_POINTS, :] * weights.T[None]).sum(dim=1)

    def forward(self, ref: torch.Tensor, q: torch.Tensor, dq: torch.Tensor) -> torch.Tensor:
        r, v, a = (self._at(w, ref) for w in (self.pos_at_d, self.vel_at_d, self.acc_at_d))
        ff = (self.abc[:, 0] * a + self.abc[:, 1] * v + self.abc[:, 2] * torch.tanh(v / EPS)
              + self._sag(r))
        return r + ff - self._at(self.pos_at_tick, ref)

    def _sag(self, r: torch.Tensor) -> torch.Tensor:
        if self.chain is not None:
            return self.gravity[0] + self.gravity[1] * self.chain.torques(r, torch)
        s = _chain_angles(r)
        feats = torch.cat([torch.ones_like(r[:, :1]), torch.sin(s), torch.cos(s)], dim=1)
        return feats @ self.gravity


class LearnedFollower(nn.Module):
    kind = "learned"

    def __init__(self, base: ModelFreeFollower, correction: Follower) -> None:
        super().__init__()
        self.base = base
        self.correction = correction

    def forward(self, ref: torch.Tensor, q: torch.Tensor, dq: torch.Tensor) -> torch.Tensor:
        return self.base(ref, q, dq) + self.correction(ref, q, dq)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


def hindsight(tracks: Sequence[Track], lookahead: int, lookahead_dt: float, tick_s: float,
              stride: int = 2, block_s: float = 2.0) -> dict[str, np.ndarray]:
    """Training samples from tracking recordings: at tick i the window is the *measured*
    position at t + k * lookahead_dt (k = 1..L), and the target residual is the command given
    at t minus the measured position one tick later (what the follower core adds its
    residual to). `episode` numbers `block_s` blocks of each recording, so a split by episode
    holds out whole stretches of motion, not neighbouring ticks."""
    step = round(lookahead_dt / tick_s)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("ref", "q", "dq", "residual", "episode")}
    for e, tr in enumerate(tracks):
        n = tr.q.shape[0] - lookahead * step - 1
        if n <= 0:
            continue
        idx = np.arange(2, n, stride)
        window = np.stack([tr.q[idx + k * step] for k in range(1, lookahead + 1)], axis=1)
        out["ref"].append(window)
        out["q"].append(tr.q[idx])
        out["dq"].append(tr.dq[idx])
        out["residual"].append(tr.u[idx] - tr.q[idx + 1])
        out["episode"].append(e * 1_000_000 + (idx * tick_s // block_s).astype(np.int64))
    if not out["ref"]:
        raise ValueError("recordings too short for a look-ahead window")
    return {k: np.concatenate(v).astype(np.float32 if k != "episode" else np.int64)
            for k, v in out.items()}


def predict(module: nn.Module, data: dict[str, np.ndarray], batch: int = 8192) -> np.ndarray:
    outs = []
    with torch.no_grad():
        for i in range(0, len(data["q"]), batch):
            outs.append(module(*(torch.from_numpy(data[k][i:i + batch])
                                 for k in ("ref", "q", "dq"))).numpy())
    return np.concatenate(outs)
