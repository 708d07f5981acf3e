"""The bundle this robot runs: verified, and its contract checked against the config, so the
follower, the planner and the planner server refuse the same things before anything starts.

A bundle is hashed, then its models are opened by path: if anyone but root and this user could
change the folder (or a folder above it, or a file in it) in between, what runs is not what was
verified. So the bundle a process runs is loaded only from where nobody else can write (the
store, /var/lib/duet/bundles, is root's; a workstation's checkout is its user's); a folder
others may write is refused before it is read.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from runtime.config import DuetConfig
from runtime.model.bundle import MANIFEST, SIGNATURE, Bundle, BundleError, load_bundle
from runtime.model.contract import Contract
from runtime.model.timing import declared_checks


def _private_group(st: os.stat_result) -> bool:
    """The owner's own group (the user-private-group convention): nobody else is in it."""
    try:
        group = grp.getgrgid(st.st_gid)
        return group.gr_name == pwd.getpwuid(st.st_uid).pw_name and \
            set(group.gr_mem) <= {group.gr_name}
    except KeyError:
        return False


def other_writers(path: Path) -> str | None:
    """Why someone other than root or this user could change `path` (None: nobody can)."""
    st = os.lstat(path)
    sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}"
    if stat.S_ISLNK(st.st_mode):  # a link's mode bits mean nothing: its folder guards it
        return None
    if st.st_mode & 0o002 and not sticky:
        return "writable by everyone"
    if st.st_mode & 0o020 and not sticky and not _private_group(st):
        return f"writable by group {st.st_gid}"
    return None


def check_writers(bundle_dir: Path, names: list[str]) -> None:
    """Refuse a bundle that others could swap between its check and its load: the folders
    from / down to it (through the link, and where it points) and its files."""
    real = bundle_dir.resolve()
    paths = [*reversed(bundle_dir.absolute().parents), *reversed(real.parents), real,
             *(real / n for n in names)]
    for path in dict.fromkeys(paths):
        if path.exists():
            why = other_writers(path)
            if why is not None:
                raise BundleError(f"{path}: {why}: a bundle is loaded only from where nobody "
                                  "but root and this user can write (verified, then opened, "
                                  "it could be swapped in between); install it into the "
                                  "store: duet bundle add")


def robot_bundle(cfg: DuetConfig) -> Bundle:
    """The configured bundle, verified, and its contract checked against this config: what
    the follower, the planner and the planner server load (nothing starts half-way)."""
    path = Path(cfg.bundle.path)
    check_writers(path, [MANIFEST, SIGNATURE])
    bundle = load_bundle(path, cfg.bundle.public_key, cfg.robot.joints)
    check_writers(path, list(bundle.files))
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
