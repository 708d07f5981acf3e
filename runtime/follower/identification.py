"""What a model-free follower needs to know of a robot's servos, fitted from recordings of the
robot tracking excitation trajectories (`duet identify`, runtime/planner/excitation.py).

A position servo under load, joint by joint, seen from its command u and the measured q:

    u_j(t - d_j) - q_j(t) = a_j q''_j + b_j q'_j + c_j tanh(q'_j / EPS) + G_j(q)

- d_j: the delay from command to motion (bus, the servo's own control period);
- a_j: inertia over position gain (s^2): sqrt(1/a_j) is the servo's effective bandwidth;
- b_j: damping and viscous friction over gain (s): the velocity lag of plain tracking;
- c_j: Coulomb friction over gain (rad);
- G_j(q): gravity (and any pose-dependent load) over gain (rad): the sag at rest. With the
  robot's description (a `GravityChain`, gravity.py) it is k_j + s_j tau_j(q): the holding
  torque the description gives, over the effective gain s_j = 1/kp_j, plus an offset. Without
  one it is linear in sin and cos of the sums of contiguous joint runs (q_i + ... + q_k), the
  terms gravity has on a serial chain, plus a constant: no kinematic model, but 1 + J(J+1)
  weights per joint that also fit the gear play's hysteresis where there is no load and
  carry it to poses the recordings never visited.

Every term is linear in the parameters, so each joint is a least-squares fit (d_j by search
over a few ticks). The follower that inverts it (policy/tracking_followers.py) commands
u(t) = r(t + d) + a r'' + b r' + c tanh(r'/EPS) + G(r), all at t + d: the reference where the
arm will be when the command acts. The fit is numpy only, so it runs on the robot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.follower.gravity import GravityChain

EPS = 0.05  # rad/s: the Coulomb term's smoothing (a sign function would chatter at rest)
MAX_DELAY_TICKS = 12
RIDGE = 1e-5  # relative to the sample count: keeps the gravity weights from cancelling
# With a nominal gain the gravity gain is pulled toward 1/kp unless the recordings span more
# holding torque than this (N·m, standard deviation): a small excitation box on a light joint
# says little about its gain, and a gain fitted there would scale the sag wrongly far away.
GAIN_PRIOR_NM = 0.05


def chain_angles(q: np.ndarray) -> np.ndarray:
    """[N, J] -> [N, J(J+1)/2]: q_i + ... + q_k for every contiguous run i <= k."""
    c = np.concatenate([np.zeros((q.shape[0], 1)), np.cumsum(q, axis=1)], axis=1)
    j = q.shape[1]
    return np.stack([c[:, k + 1] - c[:, i] for i in range(j) for k in range(i, j)], axis=1)


def gravity_features(q: np.ndarray) -> np.ndarray:
    """[N, J] -> [N, 1 + J(J+1)]: 1, sin and cos of each contiguous run's angle."""
    s = chain_angles(q)
    return np.concatenate([np.ones((q.shape[0], 1)), np.sin(s), np.cos(s)], axis=1)


@dataclass
class JointFit:
    delay_s: float
    a: float  # s^2
    b: float  # s
    c: float  # rad
    gravity: list[float]  # weights of ServoModel.gravity_features
    r2: float  # variance of (u - q) the model explains, on the held-out part
    rms_rad: float  # what it leaves, held out
    sag_rad: float = 0.0  # largest |G(q)| over the recorded poses: the sag plain tracking has

    @property
    def bandwidth_hz(self) -> float:
        return float(np.sqrt(1.0 / self.a) / (2 * np.pi)) if self.a > 0 else float("nan")


@dataclass
class ServoModel:
    """The identified robot: a fit per joint, and what it was fitted from."""

    joints: list[str]
    tick_s: float
    fits: list[JointFit]
    samples: int
    recordings: list[str]
    chain: GravityChain | None = None  # the description's gravity, if it was fitted with one

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ServoModel:
        data = json.loads(path.read_text())
        chain = data.get("chain")
        return cls(joints=list(data["joints"]), tick_s=float(data["tick_s"]),
                   fits=[JointFit(**f) for f in data["fits"]], samples=int(data["samples"]),
                   recordings=list(data["recordings"]),
                   chain=GravityChain(**chain) if chain else None)

    def gravity_features(self, q: np.ndarray) -> list[np.ndarray]:
        """Per joint, [N, K] features its `gravity` weights apply to."""
        return _gravity_features(q, self.chain)

    def feedforward(self, r: np.ndarray, v: np.ndarray, acc: np.ndarray) -> np.ndarray:
        """u - r for reference position, velocity, acceleration [N, J] at the time the
        command acts (t + d): what the servo needs beyond the target itself."""
        g = self.gravity_features(r)
        out = np.empty_like(r)
        for j, f in enumerate(self.fits):
            out[:, j] = (f.a * acc[:, j] + f.b * v[:, j] + f.c * np.tanh(v[:, j] / EPS)
                         + g[j] @ np.asarray(f.gravity))
        return out

    def table(self) -> list[dict[str, object]]:
        return [{"joint": name, "delay_ms": round(f.delay_s * 1e3, 1),
                 "bandwidth_hz": round(f.bandwidth_hz, 2), "lag_ms": round(f.b * 1e3, 1),
                 "coulomb_mrad": round(f.c * 1e3, 2),
                 "sag_mrad": round(f.sag_rad * 1e3, 1),
                 "r2": round(f.r2, 4), "rms_mrad": round(f.rms_rad * 1e3, 2)}
                for name, f in zip(self.joints, self.fits, strict=True)]


@dataclass
class Track:
    """One recording on a uniform tick grid: the command u[i] is the one sent right after
    q[i] was read (the follower publishes the state before it computes the next command)."""

    q: np.ndarray  # [N, J] rad
    dq: np.ndarray  # rad/s
    ddq: np.ndarray  # rad/s^2
    u: np.ndarray  # rad


def track(t_ns: np.ndarray, q: np.ndarray, dq: np.ndarray, q_cmd: np.ndarray,
          tick_s: float) -> Track:
    """Resample a recording's joint states onto its tick grid (a missed tick or a dropped
    message leaves a gap the interpolation bridges; the fit sees a smooth signal)."""
    t = (t_ns - t_ns[0]) / 1e9
    grid = np.arange(0.0, t[-1], tick_s)

    def on_grid(x: np.ndarray) -> np.ndarray:
        return np.stack([np.interp(grid, t, x[:, j]) for j in range(x.shape[1])], axis=1)

    qg, dqg = on_grid(q), on_grid(dq)
    # q_cmd in the state read at t[i] is the command computed one tick earlier
    ug = on_grid(q_cmd)
    u = np.vstack([ug[1:], ug[-1:]])
    # acceleration: central difference of the measured velocity over +-2 ticks
    ddq = np.zeros_like(dqg)
    ddq[2:-2] = (dqg[4:] - dqg[:-4]) / (4 * tick_s)
    return Track(qg, dqg, ddq, u)


def _gravity_features(q: np.ndarray, chain: GravityChain | None) -> list[np.ndarray]:
    if chain is None:
        return [gravity_features(q)] * q.shape[1]
    tau = chain.torques(q)
    one = np.ones((q.shape[0], 1))
    return [np.concatenate([one, tau[:, j:j + 1]], axis=1) for j in range(q.shape[1])]


def fit(tracks: Sequence[Track], joints: Sequence[str], tick_s: float,
        recordings: Sequence[str], block_s: float = 2.0, every: int = 5,
        chain: GravityChain | None = None, gain: Sequence[float] | None = None) -> ServoModel:
    """Per joint: the delay (searched) and the linear terms (least squares), judged on held-out
    stretches: every `every`-th block of `block_s` seconds (interleaved, so the held-out part
    samples the same workspace the fit saw rather than only where the recording ended).
    `chain`: the robot's gravity from its description (two gravity weights a joint); `gain`:
    the servos' nominal position gains (N·m/rad; 0: unknown), the prior of 1/gain."""
    if not tracks:
        raise ValueError("no recordings to fit")
    if chain is not None and list(chain.joints) != list(joints):
        raise ValueError(f"the gravity model's joints {chain.joints} are not the robot's "
                         f"{list(joints)}")
    features = [_gravity_features(tr.q, chain) for tr in tracks]
    width = 3 + features[0][0].shape[1]
    fits = []
    samples = 0
    for j in range(len(joints)):
        best: JointFit | None = None
        prior, ridge = np.zeros(width), np.full(width, RIDGE)
        if chain is not None and gain is not None and gain[j] > 0:
            prior[-1], ridge[-1] = 1.0 / gain[j], GAIN_PRIOR_NM**2
        for d in range(MAX_DELAY_TICKS + 1):
            rows_tr: list[np.ndarray] = []
            rows_te: list[np.ndarray] = []
            y_tr: list[np.ndarray] = []
            y_te: list[np.ndarray] = []
            for tr, feats in zip(tracks, features, strict=True):
                n = tr.q.shape[0] - d - 4
                if n <= 10:
                    continue
                sl = slice(d + 2, d + 2 + n)  # the state at t, the command at t - d
                x = np.concatenate([
                    np.stack([tr.ddq[sl, j], tr.dq[sl, j], np.tanh(tr.dq[sl, j] / EPS)], axis=1),
                    feats[j][sl]], axis=1)
                y = tr.u[2:2 + n, j] - tr.q[sl, j]
                held = (np.arange(n) * tick_s // block_s).astype(int) % every == every - 1
                rows_tr.append(x[~held])
                y_tr.append(y[~held])
                rows_te.append(x[held])
                y_te.append(y[held])
            if not rows_tr:
                continue
            xa, ya = np.concatenate(rows_tr), np.concatenate(y_tr)
            xt, yt = np.concatenate(rows_te), np.concatenate(y_te)
            w = prior + np.linalg.solve(xa.T @ xa + len(ya) * np.diag(ridge),
                                        xa.T @ (ya - xa @ prior))
            err = yt - xt @ w
            var = float(np.var(yt))
            r2 = 1.0 - float(np.var(err)) / var if var > 0 else 0.0
            cand = JointFit(delay_s=d * tick_s, a=float(w[0]), b=float(w[1]), c=float(w[2]),
                            gravity=[float(v) for v in w[3:]], r2=r2,
                            rms_rad=float(np.sqrt(np.mean(err**2))),
                            sag_rad=float(np.abs(xa[:, 3:] @ w[3:]).max()))
            if best is None or cand.rms_rad < best.rms_rad:
                best = cand
            samples = max(samples, len(ya) + len(yt))
        if best is None:
            raise ValueError("recordings too short to fit (need a few hundred ticks each)")
        fits.append(best)
    return ServoModel(list(joints), tick_s, fits, samples, list(recordings), chain)
