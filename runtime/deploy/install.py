"""`duet install` and `duet uninstall`: put duet on a robot (or into a staging tree, --root).

Install writes the units (+ drop-ins rendered from the config), the duet user (sysusers.d) and
its directories (tmpfiles.d), udev rules naming the motor bus, the config under /etc/duet, the
bundle under /var/lib/duet/bundles and the `duet` command on PATH (/usr/local/bin/duet); on
the live system (root = /) it then runs sysusers, tmpfiles, udev reload, daemon-reload and
enable. It is one transaction: every file goes through a Journal, and when any step fails the
files are restored as they were, the failure is reported in one line with its fix, and nothing
is enabled. Rerunning after fixing the cause is the way to resume.

On a Jetson (an /etc/nv_tegra_release under the root) the venv keeps NVIDIA's onnxruntime and
TensorRT (runtime/deploy/venv.py) and the planner gets the GPU providers; with an unpacked
`duet pack` archive (runtime/deploy/archive.py) pip installs from its wheelhouse alone.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from drivers.families import family_of
from runtime.config import DuetConfig, load_config
from runtime.deploy.bundle_store import BundleStore
from runtime.deploy.jetson import L4TRelease, l4t_release
from runtime.deploy.journal import Journal
from runtime.deploy.layout import STATE_DIR, Layout, find_source
from runtime.deploy.preflight import bundle_problems, sim_problems
from runtime.deploy.steps import (
    Capture,
    InstallError,
    Runner,
    capture_checked,
    external,
    run_checked,
)
from runtime.deploy.units import (
    SERVICES,
    UNITS,
    enable_offline,
    render_dropins,
    render_udev,
    render_unit,
)
from runtime.deploy.venv import VenvPlan, check_onnxruntime, make_venv, probe_onnxruntime
from runtime.follower.buses import single_bus

# Config keys the rendered drop-ins and udev rules come from: `duet config set` re-renders them.
DERIVED_KEY_PREFIXES = ("follower.realtime", "bus", "buses")


# ---------------------------------------------------------------------- install
@dataclass
class InstallPlan:
    layout: Layout
    prefix: str
    config: Path
    bundle: Path | None = None
    usb_serial: str | None = None
    venv: bool = True
    source: Path | None = None  # the duet source tree (default: found, see layout.py)
    udev_reload: bool = True
    # offline (an unpacked `duet pack` archive): duet's wheel and the wheelhouse pip uses alone
    package: Path | None = None
    wheelhouse: Path | None = None
    run: Runner = run_checked
    capture: Capture = capture_checked
    log: Callable[[str], None] = print
    live_steps: bool | None = None  # run the system steps (default: when root is /)

    @property
    def live(self) -> bool:
        return self.layout.root == Path("/") if self.live_steps is None else self.live_steps

    @property
    def bin_link(self) -> Path:
        return self.layout.root / "usr/local/bin/duet"

    def venv_bin(self, name: str = "duet") -> str:
        return f"{self.prefix.rstrip('/')}/venv/bin/{name}"


def _live_steps(plan: InstallPlan, enabled: list[str]) -> list[tuple[list[str], str]]:
    lay = plan.layout
    steps = [
        (["systemd-sysusers", str(lay.sysusers / "duet.conf")],
         f"check {lay.sysusers / 'duet.conf'} (systemd-sysusers --dry-run shows why)"),
        (["systemd-tmpfiles", "--create", str(lay.tmpfiles / "duet.conf")],
         f"check {lay.tmpfiles / 'duet.conf'} and that the user exists (id duet)"),
    ]
    if plan.udev_reload:
        fix = ("start udev (sudo systemctl start systemd-udevd); where there is no udev "
               "(a container), rerun with --no-udev-reload")
        steps += [(["udevadm", "control", "--reload"], fix),
                  (["udevadm", "trigger", "--subsystem-match=tty", "--subsystem-match=net"],
                   fix)]
    steps += [
        (["systemctl", "daemon-reload"], "is systemd running here? (systemctl "
         "is-system-running); then rerun duet install"),
        (["systemctl", "enable", *enabled], "systemd-analyze verify "
         "/etc/systemd/system/duet-*.service shows what systemd refuses"),
    ]
    return steps


def check_plan(plan: InstallPlan) -> tuple[DuetConfig, Path]:
    """Everything that can be known before a file is written: config, sim, sources, bundle,
    privileges. Returns the config and the source tree."""
    cfg = load_config(plan.config)  # ConfigError: refused before anything is touched
    sim = sim_problems(cfg)
    if sim:
        raise InstallError(f"{plan.config} is a simulated robot's config ({'; '.join(sim)}); "
                           "install a config for the real robot (bus.device: /dev/ttyDUET0, "
                           "no sim: section)")
    source = plan.source or find_source()
    if source is None or not (source / "systemd" / "duet-follower.service").is_file():
        where = source or Path.cwd()
        raise InstallError(f"duet's unit files are not in {where / 'systemd'}: run duet "
                           "install from the duet source tree, or pass --source DIR")
    if plan.bundle is not None:
        BundleStore(plan.layout.bundles, cfg.bundle.public_key, cfg.robot.joints).verify(
            plan.bundle)
    if plan.live and plan.layout.root == Path("/") and os.geteuid() != 0:
        raise InstallError("installing onto this system needs root: sudo duet install ...")
    if plan.bin_link.exists() and not plan.bin_link.is_symlink():
        raise InstallError(f"{plan.bin_link} exists and is not duet's link: move it away")
    return cfg, source


@dataclass
class Installed:
    enabled: list[str]
    l4t: L4TRelease | None = None  # a Jetson: NVIDIA's runtime kept, GPU providers
    onnxruntime: dict[str, Any] = field(default_factory=dict)  # what the venv imports


# The planner's providers on a Jetson when the robot config names none (ONNX Runtime tries
# them in this order; the follower stays on the CPU).
L4T_PLANNER_PROVIDERS = ["tensorrt", "cuda", "cpu"]


def install(plan: InstallPlan) -> Installed:
    """Install as one transaction; returns the units enabled and what was found. On failure
    every file is as it was and InstallError says which step failed and how to fix it."""
    cfg, source = check_plan(plan)
    lay = plan.layout
    l4t = l4t_release(lay.root)
    if l4t is not None:
        plan.log(f"{l4t}: NVIDIA's onnxruntime and TensorRT are kept (venv with the system "
                 "site-packages, no PyPI onnxruntime); planner providers "
                 f"{'/'.join(L4T_PLANNER_PROVIDERS)} unless the config names its own")
    venv = VenvPlan(lay.root / plan.prefix.lstrip("/") / "venv", plan.package or source,
                    plan.wheelhouse, system_site=l4t is not None)
    result = Installed([], l4t)
    journal = Journal()
    reloaded = False
    try:
        if plan.venv:
            journal.touch(venv.venv)
            make_venv(venv, plan.run, plan.log)
        result.enabled = enabled = _write_files(plan, cfg, source, journal, l4t)
        if plan.venv:
            installed = load_config(lay.config, lay.site)
            result.onnxruntime = found = probe_onnxruntime(venv, plan.capture, l4t is not None)
            check_onnxruntime(found, _providers_wanted(installed), venv, l4t is not None)
            plan.log(f"onnxruntime {found['version']} ({found['file']}): "
                     + ", ".join(found["providers"]))
        if plan.live:
            for cmd, fix in _live_steps(plan, enabled):
                external(plan.run, cmd, fix)
                reloaded = reloaded or cmd[:2] == ["systemctl", "daemon-reload"]
        else:
            for unit in enabled:
                enable_offline(lay.units, unit, journal)
    except BaseException as exc:  # Ctrl-C too: never half-installed
        undone = journal.rollback()  # a venv this run created goes too
        if reloaded:  # systemd saw the new units: let it see the restored ones
            try:
                plan.run(["systemctl", "daemon-reload"])
            except (OSError, subprocess.SubprocessError):
                pass
        done = f"rolled back ({len(undone)} paths restored or removed), nothing enabled"
        if isinstance(exc, InstallError):
            raise InstallError(f"{exc}; {done}") from None
        if isinstance(exc, OSError):
            raise InstallError(f"{exc.filename or ''}: {exc.strerror}; {done}") from None
        plan.log(done)
        raise
    plan.log("enabled: " + " ".join(enabled))
    return result


def _providers_wanted(cfg: DuetConfig) -> list[str]:
    """ONNX Runtime's names of the providers the installed config asks for."""
    from runtime.model.engines.onnxruntime_engine import PROVIDERS

    if cfg.bundle.engine != "onnxruntime":
        return []
    opts = cfg.bundle.onnxruntime
    return [PROVIDERS[n] for n in dict.fromkeys(opts.planner_providers + opts.follower_providers)]


def site_text(cfg: DuetConfig, bundle: bool, l4t: L4TRelease | None) -> str:
    """The first site file: the run dir, the state dir (the latch survives a reboot), the
    installed bundle and, on a Jetson, the planner's
    GPU providers (unless the robot config chose its own)."""
    site: dict[str, Any] = {"run_dir": "/run/duet", "state_dir": STATE_DIR}
    if bundle:
        site["bundle"] = {"path": "/var/lib/duet/bundles/current"}
    if l4t is not None and cfg.bundle.engine == "onnxruntime" and \
            "planner_providers" not in cfg.bundle.onnxruntime.model_fields_set:
        site.setdefault("bundle", {})["onnxruntime"] = {
            "planner_providers": L4T_PLANNER_PROVIDERS}
    return ("# Site overrides layered on duet.yaml; `duet config set` edits this file.\n"
            + yaml.safe_dump(site, sort_keys=False))


def _write_files(plan: InstallPlan, cfg: DuetConfig, source: Path, journal: Journal,
                 l4t: L4TRelease | None = None) -> list[str]:
    lay = plan.layout
    prefix_dir = lay.root / plan.prefix.lstrip("/")
    # the units' Documentation= points here: the README's "On the robot" section
    journal.write(prefix_dir / "README.md", (source / "README.md").read_text())
    units_src = source / "systemd"
    for unit in UNITS:
        journal.write(lay.units / unit, render_unit((units_src / unit).read_text(), plan.prefix))
    for rel, text in render_dropins(cfg).items():
        journal.write(lay.units / rel, text)
    journal.write(lay.sysusers / "duet.conf", (units_src / "duet.sysusers.conf").read_text())
    journal.write(lay.tmpfiles / "duet.conf", (units_src / "duet.tmpfiles.conf").read_text())
    for rel, text in render_udev(cfg, plan.usb_serial).items():
        journal.write(lay.root / rel, text)
    journal.symlink(plan.bin_link, plan.venv_bin())
    plan.log(f"units, drop-ins, sysusers, tmpfiles, udev rules and {plan.bin_link} written "
             f"under {lay.root}")

    journal.write(lay.config, plan.config.read_text())
    for folder in (lay.bundles, lay.recordings, lay.state / "engines"):
        journal.mkdir(folder)
    if plan.bundle is not None:
        store = BundleStore(lay.bundles, cfg.bundle.public_key, cfg.robot.joints,
                            cfg.bundle.min_version)
        version = store.manifest_version(plan.bundle)
        for name in (version, "current", "previous"):
            journal.touch(lay.bundles / name)
        added = store.add(plan.bundle)
        store.activate(version)
        plan.log(f"bundle {version} {'installed' if added else 'already there'}, current")
    if not lay.site.exists():
        journal.write(lay.site, site_text(cfg, plan.bundle is not None, l4t))
    installed = load_config(lay.config, lay.site)  # what the services load must validate
    # the bundle the services will load, as staged: under --root, not the live store's (a
    # path relative to the staged config is under it already)
    path = Path(installed.bundle.path)
    if not path.is_relative_to(lay.root):
        path = lay.root / path.relative_to("/")
    staged = installed.model_copy(update={"bundle": installed.bundle.model_copy(update={
        "path": str(path)})})
    for problem in bundle_problems(staged):
        plan.log(f"warning: {problem} (install one: duet install --bundle DIR, or duet bundle "
                 "add DIR && duet bundle activate VERSION)")
    enabled = ["duet.target", "duet-follower.service", "duet-planner.service",
               "duet-watch.service"]
    if installed.recorder.enabled:
        enabled.append("duet-recorder.service")
    return enabled


# ---------------------------------------------------------------------- uninstall
def installed_files(lay: Layout, prefix: str) -> list[Path]:
    """What install puts outside the data folders (units, drop-ins, rules, link, venv)."""
    units = [lay.units / u for u in UNITS]
    units += [lay.units / f"{u}.d" for u in SERVICES]
    units += [lay.units / t / u for t in ("multi-user.target.wants", "duet.target.wants")
              for u in UNITS]
    return [*units, lay.sysusers / "duet.conf", lay.tmpfiles / "duet.conf",
            lay.udev_rules / "99-duet-serial.rules", lay.udev_rules / "99-duet-can.rules",
            lay.network / "80-duet-can.link", lay.root / "usr/local/bin/duet",
            lay.root / prefix.lstrip("/")]


def uninstall(lay: Layout, prefix: str, purge: bool, run: Runner = run_checked,
              live: bool | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """Stop and disable the services, remove what install wrote. Keeps the config
    (/etc/duet) and the recordings unless `purge`; the duet user stays (files may be owned
    by it). Returns the paths removed."""
    live = lay.root == Path("/") if live is None else live
    if live:
        if os.geteuid() != 0 and lay.root == Path("/"):
            raise InstallError("uninstalling from this system needs root: sudo duet uninstall")
        # stop first: a unit file removed under a running service leaves it unmanageable
        present = [u for u in UNITS if (lay.units / u).is_file()]
        if present:
            external(run, ["systemctl", "disable", "--now", *present],
                     "systemctl status 'duet*' shows what did not stop")
            # a pattern matches only loaded units: stopped ones are unloaded at once
            _best_effort(run, ["systemctl", "reset-failed", "duet*"], log)
    journal = Journal()
    removed = [p for p in installed_files(lay, prefix) if journal.remove(p)]
    for folder in (lay.bundles, lay.state / "engines"):
        if journal.remove(folder):
            removed.append(folder)
    if purge:
        removed += [p for p in (lay.etc, lay.state) if journal.remove(p)]
    if live:
        _best_effort(run, ["systemctl", "daemon-reload"], log)
    kept = [] if purge else [str(p) for p in (lay.etc, lay.recordings, lay.change_log)
                             if p.exists()]
    # the duet command is gone now: the way to purge later is one that needs no duet
    rm = " ".join(shlex.quote(str(p)) for p in (lay.etc, lay.state) if p.exists())
    log(f"removed {len(removed)} paths" + (
        f"; kept {', '.join(kept)}; to remove them too: sudo rm -rf {rm}" if kept else ""))
    return removed


def _best_effort(run: Runner, cmd: list[str], log: Callable[[str], None]) -> None:
    try:
        run(cmd)
    except (OSError, subprocess.SubprocessError) as exc:
        log(f"warning: `{' '.join(cmd)}` failed ({exc})")


def rerender(lay: Layout, cfg: DuetConfig, journal: Journal) -> list[Path]:
    """After a config change on an installed tree: rewrite the drop-ins and udev rules that
    come from the config (the adapter match, from --usb-serial, is kept as installed).
    Returns the files that changed; nothing when duet is not installed under `lay`."""
    if not (lay.units / "duet-follower.service").is_file():
        return []
    files = {lay.units / rel: text for rel, text in render_dropins(cfg).items()}
    fam = family_of(single_bus(cfg, "duet config set"))
    rules = lay.root / fam.config_rules if fam.config_rules is not None else None
    if rules is not None and rules.is_file():
        serial = fam.usb_serial_in(rules.read_text())
        files.update({lay.root / rel: text for rel, text in render_udev(cfg, serial).items()})
    return [path for path, text in files.items() if journal.write(path, text)]
