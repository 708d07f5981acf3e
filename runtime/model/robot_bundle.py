"""The bundle this robot runs: verified, and its contract checked against the config, so the
follower, the planner and the planner server refuse the same things before anything starts."""

from __future__ import annotations

from runtime.config import DuetConfig
from runtime.model.bundle import Bundle, BundleError, load_bundle
from runtime.model.contract import Contract
from runtime.model.timing import declared_checks


def robot_bundle(cfg: DuetConfig) -> Bundle:
    """The configured bundle, verified, and its contract checked against this config: what
    the follower, the planner and the planner server load (nothing starts half-way)."""
    bundle = load_bundle(cfg.bundle.path, cfg.bundle.public_key, cfg.robot.joints)
    problems = contract_problems(bundle.contract, cfg)
    if problems:
        raise BundleError(f"{bundle.path}: this configuration cannot run it:\n  "
                          + "\n  ".join(problems))
    return bundle


def contract_problems(contract: Contract, cfg: DuetConfig) -> list[str]:
    """What the robot cannot give the bundle's models, naming the input and the reason."""
    out = []
    cams = cfg.planner.cameras
    for cam in contract.cameras():
        have = cams.get(cam.camera)
        if have is None:
            out.append(f"input {cam.name}: reads camera {cam.camera!r}, which the config does "
                       f"not define (planner.cameras: {', '.join(cams) or 'none'})")
        elif cam.resize == "none" and (have.width, have.height) != (cam.width, cam.height):
            out.append(f"input {cam.name}: takes {cam.width}x{cam.height} with resize: none; "
                       f"planner.cameras.{cam.camera} delivers {have.width}x{have.height}")
    for stage in contract.planner.stages:
        if stage.flow is None:
            continue
        k = cfg.planner.flow_steps or stage.flow.steps
        out += [] if k >= 1 else [f"stage {stage.name}: flow steps {k} < 1"]
    if contract.follower is not None:  # its look-ahead window is read off the tick grid
        ref = contract.follower.reference
        ticks = ref.dt_s * cfg.follower.hz
        if abs(ticks - round(ticks)) > 1e-6 or round(ticks) < 1:
            out.append(f"follower input {ref.name}: a look-ahead point every {ref.dt_s * 1e3:g}"
                       f" ms is not a whole number of ticks at follower.hz={cfg.follower.hz:g}"
                       f" (a tick is {1e3 / cfg.follower.hz:g} ms); choose follower.hz as a "
                       f"multiple of {1 / ref.dt_s:g} Hz")
    out += [f"planner.latency: {why}" for level, why in declared_checks(contract, cfg)
            if level == "fail"]
    return out
