"""`duet install | pack | uninstall`: putting duet on a robot and taking it off."""

from __future__ import annotations

import argparse
from pathlib import Path

from runtime.commands import options as cliopts
from runtime.commands.options import EXIT_USAGE, emit, fail
from runtime.deploy.layout import DEFAULT_PREFIX, Layout


def _install(args: argparse.Namespace) -> int:
    import tempfile

    from runtime.config import ConfigError
    from runtime.deploy.archive import ArchiveError, unpack
    from runtime.deploy.install import InstallError, InstallPlan, install
    from runtime.deploy.steps import log_to_stderr, run_to_stderr
    from runtime.deploy.units import restart_command
    from runtime.model.bundle import BundleError

    if args.sha256 is not None and args.offline is None:
        return fail("duet install", "--sha256 checks an --offline ARCHIVE: give both",
                    EXIT_USAGE)
    if args.config is None and args.offline is None:
        return fail("duet install", "--config FILE is required (or --offline ARCHIVE, which "
                    "carries one)", EXIT_USAGE)
    plan = InstallPlan(layout=Layout(Path(args.root)), prefix=args.prefix,
                       config=args.config, bundle=args.bundle,
                       usb_serial=args.usb_serial, venv=not args.no_venv,
                       source=args.source, udev_reload=args.udev_reload)
    if args.json:  # progress to stderr: stdout is the one JSON object
        plan.run, plan.log = run_to_stderr, log_to_stderr
    with tempfile.TemporaryDirectory(prefix="duet-offline-") as tmp:
        try:
            if args.offline is not None:  # everything from the verified archive, no network
                got = unpack(args.offline, Path(tmp), args.sha256, check_target=plan.venv)
                plan.config = args.config or got.config
                plan.bundle = args.bundle or got.bundle
                plan.source = args.source or got.source
                plan.package, plan.wheelhouse = got.wheel, got.wheels
                plan.log(f"{args.offline}: {len(got.manifest['files'])} files verified (sha256), "
                      f"packed for {got.manifest['target']['machine']} Python "
                      f"{got.manifest['target']['python']}")
            done = install(plan)
        except (ConfigError, ArchiveError) as exc:
            return fail("duet install", exc, EXIT_USAGE)
        except (BundleError, InstallError, OSError) as exc:
            return fail("duet install", exc)
    hint = (f"start: sudo systemctl start duet.target ; check: duet doctor ; after a change: "
            f"{restart_command()}") if plan.live else f"staged under {plan.layout.root}"
    emit(args, f"installed. {hint}", {
        "installed": True, "enabled": done.enabled, "root": str(plan.layout.root),
        "offline": args.offline is not None,
        "l4t": done.l4t.name if done.l4t is not None else None,
        "jetpack": done.l4t.jetpack if done.l4t is not None else None,
        "onnxruntime": done.onnxruntime or None})
    return 0


def _pack(args: argparse.Namespace) -> int:
    from runtime.config import ConfigError
    from runtime.deploy.archive import ArchiveError, Target, pack
    from runtime.deploy.layout import find_source
    from runtime.deploy.steps import StepFailed, log_to_stderr, run_checked, run_to_stderr
    from runtime.model.bundle import BundleError

    try:
        target = Target(args.platform, args.python, args.glibc)
        source = args.source or find_source()
        if source is None:
            raise ArchiveError("not in a duet source tree: run duet pack from the checkout, or "
                               "pass --source DIR")
        out = args.out or Path(f"duet-{target.label}.tar.gz")
        result = pack(args.config, args.bundle, target, out, source,
                      run=run_to_stderr if args.json else run_checked,
                      log=log_to_stderr if args.json else print)
    except StepFailed as exc:
        return fail("duet pack", exc)
    except (ConfigError, ArchiveError, BundleError) as exc:
        return fail("duet pack", exc, EXIT_USAGE)
    emit(args, "", result)
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    from runtime.deploy.install import InstallError, uninstall

    try:
        removed = uninstall(Layout(Path(args.root)), args.prefix, args.purge)
    except (InstallError, OSError) as exc:
        return fail("duet uninstall", exc)
    emit(args, "uninstalled", {"removed": [str(p) for p in removed], "purge": args.purge})
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sc = cliopts.subcommand
    p = sc(sub, "install", "install duet on this robot (or stage it into --root)",
           "sudo duet install --config configs/myrobot.yaml --bundle bundles/reference "
           "--usb-serial FT7WXYZ1\nduet install --root /tmp/stage --no-venv --config "
           "configs/myrobot.yaml\nsudo duet install --offline duet-aarch64-cp310.tar.gz "
           "--sha256 HEX   # from duet pack, no network",
           description="Install duet as one transaction: the venv, units and drop-ins, the "
           "duet user, udev rules, config, bundle and /usr/local/bin/duet; then (on /) "
           "sysusers, tmpfiles, udev reload, daemon-reload, enable. Any failing step is "
           "reported in one line with its fix and every file is restored: rerun once fixed. "
           "On a Jetson (/etc/nv_tegra_release) the venv sees the system site-packages and "
           "gets no PyPI onnxruntime, so NVIDIA's onnxruntime-gpu and TensorRT are used.")
    p.add_argument("--root", default="/", help="stage into this tree instead of /")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="where the virtualenv goes")
    p.add_argument("--config", type=Path, default=None,
                   help="the robot's config, installed as /etc/duet/duet.yaml (not a sim one); "
                   "with --offline: the archive's unless given")
    p.add_argument("--bundle", type=Path, default=None, help="bundle folder to install "
                   "(with --offline: the archive's unless given)")
    p.add_argument("--offline", type=Path, default=None, metavar="ARCHIVE",
                   help="install from a `duet pack` archive with no network: its hashes are "
                   "verified first, pip uses its wheels alone")
    p.add_argument("--sha256", default=None, metavar="HEX", help="with --offline: refuse the "
                   "archive unless its sha256 is this (the one duet pack printed)")
    p.add_argument("--usb-serial", default=None,
                   help="USB serial number of the bus adapter (stable udev match)")
    p.add_argument("--no-venv", action="store_true", help="skip creating the virtualenv")
    p.add_argument("--source", type=Path, default=None,
                   help="duet source tree (default: this checkout, or the working directory)")
    p.add_argument("--no-udev-reload", dest="udev_reload", action="store_false",
                   help="write the udev rules but do not reload udev (no udevd: a container)")
    cliopts.add_json(p)
    p.set_defaults(func=_install)

    p = sc(sub, "pack", "one archive for an install without network: wheels for the "
           "robot's platform, duet, the bundle, units, config",
           "duet pack --platform aarch64 --python 3.10 --config configs/myrobot.yaml --bundle "
           "bundles/reference --out duet-orin.tar.gz\n"
           "# then on the robot: sudo duet install --offline duet-orin.tar.gz --sha256 HEX",
           description="On a workstation with network: build duet's wheel, download a wheel of "
           "every robot dependency for the target (pip download --only-binary=:all: with its "
           "manylinux platforms, CPython version and implementation), and put them with the "
           "bundle, the unit files and the config into one tar.gz whose manifest.json lists "
           "the sha256 of every file. `duet install --offline` installs it with no network. "
           "On a Jetson the wheelhouse's onnxruntime is left out of the venv (NVIDIA's is "
           "kept).")
    p.add_argument("--platform", default="aarch64", help="the robot's machine: aarch64 (Jetson, "
                   "default) or x86_64")
    p.add_argument("--python", default="3.10", help="the robot's CPython (JetPack 6: 3.10, the "
                   "default)")
    p.add_argument("--glibc", default="2.35", help="the robot's glibc: wheels up to this "
                   "manylinux (JetPack 6 / Ubuntu 22.04: 2.35, the default)")
    p.add_argument("--config", type=Path, required=True, help="the robot's config (not a sim "
                   "one); validated here")
    p.add_argument("--bundle", type=Path, default=None, help="bundle folder (verified here)")
    p.add_argument("--out", type=Path, default=None,
                   help="archive path (default: duet-PLATFORM-cpXY.tar.gz here)")
    p.add_argument("--source", type=Path, default=None,
                   help="duet source tree (default: this checkout, or the working directory)")
    cliopts.add_json(p)
    p.set_defaults(func=_pack)

    p = sc(sub, "uninstall", "stop and remove duet (keeps /etc/duet and recordings unless "
           "--purge)", "sudo duet uninstall\nsudo duet uninstall --purge")
    p.add_argument("--root", default="/", help="the tree duet was installed into")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="where the virtualenv is")
    p.add_argument("--purge", action="store_true",
                   help="also remove /etc/duet and /var/lib/duet (recordings, change log)")
    cliopts.add_json(p)
    p.set_defaults(func=_uninstall)
