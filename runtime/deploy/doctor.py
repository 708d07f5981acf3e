"""`duet doctor`: is this machine ready to run duet? One ok/warn/fail line per check, each
problem with its fix; exit 1 when anything fails.

Checks are plain functions of the config and the host (paths under `sys_root` so the
kernel-facing ones can be pointed at another tree); none of them needs the services running.
The robot's checks (bus, bundle, engine, cameras, services, run dir) are here, the host's
(real time, governor, clock, CPU, disk, Jetson) in host_checks.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from drivers.device_access import Account
from drivers.families import family_of
from runtime.config import BusConfig, ConfigError, DuetConfig, load_config
from runtime.deploy.host_checks import (
    FAIL,
    OK,
    WARN,
    Check,
    check_clock,
    check_cpu,
    check_disk,
    check_governor,
    check_jetson,
    check_realtime,
    tool_output,
)
from runtime.follower.buses import bus_sections


def check_bus(bus: BusConfig, installed: bool = False, sys_root: Path = Path("/sys"),
              who: Account | None = None) -> Check:
    """The bus's device, as its family checks it (a serial device's node and permissions for
    `who`, the follower's account; a CAN interface being up, ...)."""
    level, detail, fix = family_of(bus).check_device(bus, installed, str(sys_root), who)
    return Check("bus device", level, detail, fix)


def follower_account(root: Path) -> tuple[Account | None, list[Check]]:
    """Whom the follower runs as in the install at `root` (its unit's User=, Group=,
    SupplementaryGroups=), so the device check answers for it and not for the operator who
    runs doctor. None, with a warning, when the unit names a user this host lacks."""
    from runtime.deploy.layout import Layout
    from runtime.deploy.units import service_settings

    units = Layout(root).units
    settings = service_settings(units, "duet-follower.service")
    users, groups = settings.get("User"), settings.get("Group")
    if not users:
        return None, []
    user = users[-1]
    try:
        return Account.service(user, groups[-1] if groups else None,
                               settings.get("SupplementaryGroups", []),
                               "the follower's user"), []
    except KeyError as exc:
        return None, [Check("service user", WARN, f"{units / 'duet-follower.service'} runs as "
                            f"{user}, but {exc.args[0]} does not exist here: the device is "
                            "checked for you instead", "sudo systemd-sysusers (duet install "
                            "creates the users)")]


def check_bundle(cfg: DuetConfig) -> list[Check]:
    from runtime.model.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(cfg.bundle.path, cfg.bundle.public_key, list(cfg.robot.joints))
    except BundleError as exc:
        return [Check("bundle", FAIL, str(exc),
                      "duet bundle rollback, or reinstall the bundle: duet install --bundle DIR")]
    out = [Check("bundle", OK, f"{bundle.manifest.version} at {cfg.bundle.path}: hashes ok"
                 + (", signature ok" if bundle.signed else ""))]
    if cfg.bundle.public_key is None:
        out.append(Check("bundle signature", WARN, "bundle.public_key not set: any bundle "
                         "with matching hashes loads", "set bundle.public_key to the "
                         "export signing key's public half"))
    return out


def check_engine(cfg: DuetConfig, jetson: bool = False) -> list[Check]:
    out = []
    if cfg.bundle.engine == "tensorrt":
        try:
            import tensorrt

            out.append(Check("engine", OK, f"TensorRT {tensorrt.__version__}"))
        except ImportError:
            out.append(Check("engine", FAIL, "bundle.engine is tensorrt but TensorRT is not "
                             "importable", "install JetPack's python3-libnvinfer into the venv "
                             "(--system-site-packages) or set bundle.engine=onnxruntime"))
        gpu = [p for p in ("/dev/nvidia0", "/dev/nvhost-gpu", "/dev/nvgpu/igpu0/ctrl")
               if Path(p).exists()]
        out.append(Check("gpu", OK, f"GPU device {gpu[0]}") if gpu else
                   Check("gpu", FAIL, "no GPU device node",
                         "check the NVIDIA driver (nvidia-smi / tegrastats)"))
        return out
    return check_providers(cfg, jetson)


def check_providers(cfg: DuetConfig, jetson: bool) -> list[Check]:
    """The execution providers ONNX Runtime offers here, against those the config asks for."""
    import onnxruntime

    from runtime.model.engines.onnxruntime_engine import PROVIDERS, ort_cache_dir

    offered = onnxruntime.get_available_providers()
    dists = metadata.packages_distributions().get("onnxruntime", [])
    where = f"{Path(onnxruntime.__file__).parent}" + (f", {'/'.join(dists)}" if dists else "")
    out = [Check("engine", OK, f"onnxruntime {onnxruntime.__version__} ({where}) offers "
                 f"{', '.join(offered)}")]
    gpu = {PROVIDERS["tensorrt"], PROVIDERS["cuda"]}
    if jetson and not gpu & set(offered):
        out.append(Check("onnxruntime", WARN, "a CPU-only onnxruntime on a Jetson: the planner "
                         "cannot use the GPU", "install NVIDIA's onnxruntime-gpu for this JetPack "
                         "(Jetson AI Lab / Jetson Zoo wheel), then reinstall duet (duet install "
                         "keeps PyPI's onnxruntime out of the venv on L4T)"))
    opts = cfg.bundle.onnxruntime
    for role in ("planner", "follower"):
        names = getattr(opts, f"{role}_providers")
        key = f"bundle.onnxruntime.{role}_providers"
        missing = [n for n in names if PROVIDERS[n] not in offered]
        if missing:
            out.append(Check("providers", FAIL, f"{key} asks for {', '.join(missing)}, which "
                             "this onnxruntime does not offer: that process will not start",
                             "install NVIDIA's onnxruntime-gpu (and no PyPI onnxruntime over it),"
                             f" or: duet config set {key}=[cpu]"))
        else:
            cache = f"; TensorRT engines in {ort_cache_dir(cfg.bundle.engine_cache)}" \
                if "tensorrt" in names else ""
            out.append(Check("providers", OK, f"{role}: {', '.join(names)}{cache}"))
    return out


def check_cameras(cfg: DuetConfig) -> list[Check]:
    """Every configured camera: a V4L2 device must exist and be readable."""
    from runtime.deploy.preflight import camera_problems

    found = camera_problems(cfg)
    if found:
        return [Check("camera", FAIL, p, "plug the camera in; `v4l2-ctl --list-devices` "
                      "names it; duet-planner (the planner's user) is in group video")
                for p in found]
    kinds = ", ".join(f"{n} ({c.kind}{' ' + c.device if c.kind == 'v4l2' else ''})"
                      for n, c in cfg.planner.cameras.items())
    return [Check("camera", OK, kinds or "no camera configured")]


def check_remote(cfg: DuetConfig) -> list[Check]:
    """The off-board planner: key files, and plaintext TCP flagged (preflight.remote_checks)."""
    from runtime.deploy.preflight import remote_checks

    return [Check("off-board planner", level, detail, fix)
            for level, detail, fix in remote_checks(cfg)]


def _systemctl_show(unit: str) -> dict[str, str]:
    out = tool_output(["systemctl", "show", unit, "-p", "LoadState", "-p", "ActiveState",
                "-p", "SubState", "-p", "Result", "-p", "NRestarts", "-p", "UnitFileState"])
    if out is None:
        return {}
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def check_services(cfg: DuetConfig, root: Path = Path("/")) -> list[Check]:
    """The services of an installed duet, as systemd sees them."""
    from runtime.deploy.layout import Layout
    from runtime.deploy.units import restart_command

    units_dir = Layout(root).units
    if not (units_dir / "duet-follower.service").is_file():
        return [Check("services", OK, "duet is not installed here (no units): checks of a "
                      "workstation run only")]
    if shutil.which("systemctl") is None:
        return [Check("services", WARN, "systemctl not found", "run duet doctor on the robot")]
    units = ["duet-follower.service", "duet-planner.service"]
    if cfg.recorder.enabled:
        units.append("duet-recorder.service")
    out = []
    for unit in units:
        info = _systemctl_show(unit)
        state, sub, result = (info.get("ActiveState", "?"), info.get("SubState", "?"),
                              info.get("Result", "?"))
        detail = f"{unit}: {state}/{sub}, restarts {info.get('NRestarts', '?')}"
        if state == "active":
            out.append(Check("service", OK, detail))
        elif state == "failed":
            why = " (start limit hit: systemd stopped restarting it)" \
                if result == "start-limit-hit" else f" (result {result})"
            out.append(Check("service", FAIL, detail + why,
                             f"journalctl -u {unit} -n 50 shows why; once fixed: "
                             f"{restart_command(root=root)}"))
        elif state in ("activating", "deactivating", "reloading"):
            out.append(Check("service", WARN, detail, f"journalctl -u {unit} -f"))
        else:
            out.append(Check("service", WARN, detail + " (not started)",
                             "sudo systemctl start duet.target"))
    return out


def check_run_dir(run_dir: str, state_dir: str | None = None) -> list[Check]:
    """The live run dir: who holds it, a latched fault (also one kept in the state dir across
    a reboot), a telemetry sample."""
    from runtime.ipc import endpoints, rundir
    from runtime.ipc.follower_mode import reset_command
    from runtime.observe.status import ROBOT, collect, diagnosis, setting

    path = Path(run_dir)
    if not path.exists():
        return [Check("run dir", WARN, f"{path} absent: nothing running here",
                      "sudo systemctl start duet.target (or --run-dir / DUET_RUN_DIR)")]
    out = []
    if not os.access(path, os.R_OK | os.X_OK):
        out.append(Check("run dir", FAIL, f"{path} not readable by you (uid {os.getuid()}): "
                         "status, estop and doctor cannot reach the sockets",
                         "add yourself to the operators' group: sudo usermod -aG duet $USER "
                         "(log in again)"))
        return out
    for latch in dict.fromkeys([path / endpoints.LATCH] + (
            [] if state_dir is None else [Path(state_dir) / endpoints.LATCH])):
        if latch.exists():
            try:
                text = latch.read_text().strip()
            except OSError as exc:
                text = f"(unreadable: {exc.strerror})"
            reset = reset_command(text.split(":", 1)[0], setting(run_dir) == ROBOT)
            out.append(Check("latched fault", FAIL, f"{latch}: {text}",
                             f"check the robot, then: {reset} (the latch survives restarts"
                             + (" and reboots)" if latch.parent != path else ")")))
            break
    held, pid = rundir.holder(path, endpoints.FOLLOWER_LOCK)
    if not held:
        out.append(Check("run dir", WARN, f"{path}: no follower holds it",
                         "sudo systemctl start duet.target"))
        return out
    sample = collect(run_dir, 1.5)
    found = diagnosis(sample, setting(run_dir), in_doctor=True)
    follower = sample.get("follower") or {}
    detail = (f"{path}: follower pid {pid or '?'} in {follower.get('mode', '?')}, "
              f"planner {(sample.get('planner') or {}).get('status', 'silent')}")
    out.append(Check("run dir", OK, detail) if not found else
               Check("run dir", FAIL, f"{detail}; " + "; ".join(w for w, _ in found),
                     "; ".join(dict.fromkeys(step for _, step in found))))
    return out


def diagnose(config: Path, site: Path | None, run_dir: str) -> list[Check]:
    from runtime.deploy.layout import installed_root

    try:
        cfg = load_config(config, site)
    except ConfigError as exc:
        return [Check("config", FAIL, str(exc), "fix the file, then: duet config validate")]
    root = installed_root(config)
    installed = root is not None
    system = root if root is not None else Path("/")  # a staged install: its /etc
    jetson = check_jetson(system)
    checks = [Check("config", OK, f"{config}" + (f" + {site}" if site and site.exists() else ""))]
    who, warned = follower_account(root) if root is not None else (None, [])
    checks += warned
    steps: list[Callable[[], Check | list[Check]]] = [
        lambda: [check_bus(bus, installed, who=who) for bus, _ in bus_sections(cfg)],
        lambda: check_cameras(cfg),
        lambda: check_services(cfg),
        lambda: check_run_dir(run_dir, cfg.state_dir),
        lambda: check_cpu(cfg),
        lambda: check_realtime(cfg),
        lambda: check_governor(cfg.follower.realtime.cpu),
        check_clock,
        lambda: check_bundle(cfg),
        lambda: jetson,
        lambda: check_engine(cfg, bool(jetson)),
        lambda: check_disk(cfg),
        lambda: check_remote(cfg),
    ]
    for step in steps:
        result = step()
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def report(checks: list[Check]) -> tuple[str, int]:
    style = {OK: "ok  ", WARN: "WARN", FAIL: "FAIL"}
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{style[c.level]}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.level != OK:
            lines.append(f"      {'':<{width}}  fix: {c.fix}")
    fails = sum(c.level == FAIL for c in checks)
    warns = sum(c.level == WARN for c in checks)
    lines.append(f"{len(checks)} checks: {fails} failed, {warns} warnings")
    return "\n".join(lines), 1 if fails else 0
