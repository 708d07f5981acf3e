"""Gravity on a robot's joints from its description: the torque G(q) that holds each joint
at rest (MuJoCo's `qfrc_bias` at zero velocity), from the kinematic tree and the links'
masses and centres of mass.

One function serves the robot and the workstation: `GravityChain.torques(q, xp)` runs on
numpy (identification, on the robot) and on torch (inside a follower's ONNX graph), because
it uses only what both array modules share (sin, cos, matmul, stack, broadcasting).

Why a model and not a free fit: a position servo sags by G(q) over its effective gain, and
the recordings of an excitation only see the poses it visited. Free trig features fitted per
joint follow whatever else moves u - q (the gear play's hysteresis on a joint with no load at
all) and extrapolate it; the description gives the shape of the load everywhere, so the data
only have to give two numbers per joint (identification.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class GravityChain:
    """A robot's bodies in tree order (a parent before its children); lists, so it is JSON."""

    joints: list[str]
    parent: list[int]  # index of the parent body here, -1: fixed to the world
    pos: list[list[float]]  # the body's origin in its parent's frame, every joint at 0
    rot: list[list[list[float]]]  # the body's orientation in its parent's frame (3x3)
    joint: list[int]  # the robot joint that moves the body, -1: none
    scale: list[float]  # the body turns (or slides) by offset + scale * q[joint] from its pose
    offset: list[float]  # above: 1 and -q0 for a robot joint's own body, other figures for a
    coupled: list[bool]  # joint the MJCF couples to a robot joint (a gripper's second jaw)
    slide: list[bool]  # a prismatic joint (the angle is metres)
    anchor: list[list[float]]  # the joint's point, body frame
    axis: list[list[float]]  # the joint's unit axis, body frame
    mass: list[float]  # kg
    com: list[list[float]]  # centre of mass, body frame
    gravity: list[float]  # m/s^2, world frame

    def torques(self, q: Any, xp: Any = np) -> Any:
        """[N, J] joint positions -> [N, J] holding torques (N·m; N on a slide)."""
        def const(x: object) -> Any:
            return xp.asarray(np.asarray(x, dtype=np.float64), dtype=q.dtype)

        ones = q[:, :1] * 0 + 1  # [N, 1]: every pose gets its own frames (broadcasting)
        eye = const(np.eye(3))
        frames: list[tuple[Any, Any]] = []  # per body: (R [N,3,3], p [N,3]) in the world
        weighted: list[Any] = []  # per body: mass * centre of mass [N,3]
        own: dict[int, tuple[Any, Any, bool]] = {}  # robot joint -> (anchor, axis, slide)
        for b, parent in enumerate(self.parent):
            if parent < 0:
                r_p, p_p = ones[:, :, None] * eye, ones * const([0.0, 0.0, 0.0])
            else:
                r_p, p_p = frames[parent]
            r = r_p @ const(self.rot[b])
            p = p_p + (r_p @ const(self.pos[b])[:, None])[..., 0]
            j = self.joint[b]
            if j >= 0:
                angle = self.offset[b] + self.scale[b] * q[:, j]
                axis_w = (r @ const(self.axis[b])[:, None])[..., 0]
                anchor_w = p + (r @ const(self.anchor[b])[:, None])[..., 0]
                if self.slide[b]:
                    p = p + axis_w * angle[:, None]
                else:
                    k = const(_skew(self.axis[b]))
                    turn = (eye + xp.sin(angle)[:, None, None] * k
                            + (1 - xp.cos(angle))[:, None, None] * (k @ k))
                    r = r @ turn
                    p = anchor_w - (r @ const(self.anchor[b])[:, None])[..., 0]
                if not self.coupled[b]:
                    own[j] = (anchor_w, axis_w, self.slide[b])
            frames.append((r, p))
            weighted.append(self.mass[b] * (p + (r @ const(self.com[b])[:, None])[..., 0]))
        g = const(self.gravity)
        out = []
        for j in range(len(self.joints)):
            if j not in own:
                raise ValueError(f"gravity chain: no body moves with joint {self.joints[j]}")
            anchor_w, axis_w, slide = own[j]
            below = self._subtree(j)
            mass = sum(self.mass[b] for b in below)
            if slide:
                out.append(-mass * (axis_w * g).sum(-1))
                continue
            moment = sum(weighted[b] for b in below) - mass * anchor_w  # sum m (c - anchor)
            out.append(-(moment * _cross(g, axis_w, xp)).sum(-1))
        return xp.stack(out, -1)

    def _subtree(self, j: int) -> list[int]:
        """The bodies that move with robot joint j: its own body and all below it."""
        root = next(b for b, jj in enumerate(self.joint) if jj == j and not self.coupled[b])
        inside = {root}
        for b in range(root + 1, len(self.parent)):  # tree order: parents come first
            if self.parent[b] in inside:
                inside.add(b)
        return sorted(inside)


def _skew(v: list[float]) -> np.ndarray:
    x, y, z = v
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def _cross(a: Any, b: Any, xp: Any) -> Any:
    """a [3] x b [N,3]."""
    return xp.stack([a[1] * b[:, 2] - a[2] * b[:, 1], a[2] * b[:, 0] - a[0] * b[:, 2],
                     a[0] * b[:, 1] - a[1] * b[:, 0]], -1)
