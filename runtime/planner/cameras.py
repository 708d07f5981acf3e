"""Pick the planner's camera from the config (drivers/ stays free of runtime imports)."""

from __future__ import annotations

from drivers.camera import Camera
from runtime.config import CameraConfig
from runtime.ipc import endpoints


def open_camera(name: str, cfg: CameraConfig, run_dir: str) -> Camera:
    from drivers.camera import SimCamera, V4L2Camera

    if cfg.kind == "sim":
        return SimCamera(endpoints.sim(run_dir), cfg.width, cfg.height, camera=name,
                         max_bytes=endpoints.MAX_SIM_BYTES)
    return V4L2Camera(cfg.device, width=cfg.width, height=cfg.height, fps=cfg.fps)
