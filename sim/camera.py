"""The sim's camera: the fixed 3/4 "scene" camera rendered offscreen to 96x96 RGB.

One `SceneCamera` holds one OpenGL context, which belongs to the thread that created it:
create it in the thread that renders (the sim server's camera thread, or the caller in
lockstep use).
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the import
# Mesa's llvmpipe (the CPU renderer behind EGL here) otherwise starts one raster thread per
# core, and each 96x96 frame then briefly takes every core from the real-time follower.
os.environ.setdefault("LP_NUM_THREADS", "1")
import mujoco

WIDTH = 96
HEIGHT = 96
CAMERA = "scene"


class SceneCamera:
    def __init__(self, model: mujoco.MjModel, width: int = WIDTH, height: int = HEIGHT,
                 camera: str = CAMERA) -> None:
        self.model = model
        self.camera = model.camera(camera).id
        self._renderer = mujoco.Renderer(model, height, width)
        self._out = np.empty((height, width, 3), dtype=np.uint8)
        # A private state copy for rendering beside a stepping world (`SimWorld.snapshot`).
        self.shadow = mujoco.MjData(model)

    def render(self, data: mujoco.MjData) -> np.ndarray:
        """Render `data`'s poses (kinematics and camera/light poses recomputed here, so a
        bare qpos copy is enough); returns a new uint8 [H, W, 3] RGB array."""
        mujoco.mj_kinematics(self.model, data)
        mujoco.mj_comPos(self.model, data)  # mj_camlight reads subtree centres of mass
        mujoco.mj_camlight(self.model, data)  # camera poses: not part of mj_kinematics
        self._renderer.update_scene(data, self.camera)
        self._renderer.render(out=self._out)
        return self._out.copy()

    def close(self) -> None:
        self._renderer.close()
