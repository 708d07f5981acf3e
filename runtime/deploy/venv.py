"""The virtualenv `duet install` makes under the prefix: duet and its robot dependencies only
(never torch), from the package index or, offline, from a wheelhouse alone.

On a Jetson (L4T) the venv keeps NVIDIA's runtime. JetPack's TensorRT Python bindings live in
the system's dist-packages and NVIDIA's onnxruntime-gpu is a wheel installed system-wide; a
PyPI `onnxruntime` (CPU only) in the venv would shadow the latter. So on L4T the venv sees the
system site-packages, duet is installed without dependencies, and its dependencies are then
installed by name, less onnxruntime. A pip constraints file cannot do this: constraints narrow
versions but never drop a requirement, and pip would not count NVIDIA's distribution (named
`onnxruntime-gpu`) as satisfying `onnxruntime`, so it would fetch the CPU wheel anyway.
Afterwards the venv's own python is asked which onnxruntime it imports and which providers it
offers; the install fails (and rolls back) unless that is the runtime the config needs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path
from typing import Any

from runtime.deploy.steps import Capture, Runner, StepFailed, external

DIST = "duet-runtime"
# Provided by JetPack on L4T (NVIDIA's onnxruntime-gpu), never installed into the venv there.
VENDOR_KEPT = frozenset({"onnxruntime"})
VENDOR_FIX = ("install NVIDIA's onnxruntime-gpu for this JetPack system-wide (python3 -m pip "
              "install onnxruntime_gpu-<version>-cp310-cp310-linux_aarch64.whl, from the Jetson "
              "AI Lab index or the Jetson Zoo), then rerun duet install")
# What the venv's python reports about the onnxruntime it imports.
PROBE = ("import json, onnxruntime as o\n"
         "from importlib import metadata as m\n"
         "print(json.dumps({'version': o.__version__, 'file': o.__file__,\n"
         "  'providers': o.get_available_providers(),\n"
         "  'dists': m.packages_distributions().get('onnxruntime', [])}))")


@dataclass(frozen=True)
class VenvPlan:
    venv: Path
    package: Path  # what pip installs: the source tree, or duet's wheel (offline)
    wheelhouse: Path | None = None  # offline: pip --no-index --find-links, nothing else
    system_site: bool = False  # L4T: see JetPack's TensorRT and NVIDIA's onnxruntime-gpu

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def robot_requirements(requires: list[str], kept: frozenset[str] = VENDOR_KEPT) -> list[str]:
    """duet's Requires-Dist without extras and without what the vendor provides."""
    out = []
    for req in requires:
        spec, _, marker = req.partition(";")
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
        if name is None or "extra" in marker or canonical(name.group(1)) in kept:
            continue
        out.append(req.strip())
    return out


def installed_requires(venv: Path) -> list[str]:
    """Requires-Dist of duet as installed in `venv` (read from its dist-info)."""
    found = sorted(venv.glob("lib/python*/site-packages/duet_runtime-*.dist-info/METADATA"))
    if not found:
        raise StepFailed(f"{venv}: no duet_runtime dist-info after installing it; fix: check "
                         "pip's output above")
    return Parser().parsestr(found[-1].read_text()).get_all("Requires-Dist") or []


def make_venv(plan: VenvPlan, run: Runner, log: Callable[[str], None] = print) -> None:
    flags = ["--system-site-packages"] if plan.system_site else []
    external(run, [sys.executable, "-m", "venv", *flags, str(plan.venv)],
             "install the venv module (Debian/Ubuntu: apt-get install python3-venv)")
    # -I: the caller's PYTHONPATH is no part of the venv (a source tree on it would count as
    # duet already installed)
    pip = [plan.python, "-I", "-m", "pip"]
    if plan.wheelhouse is not None:
        # --isolated: no PIP_* variables or user config add other sources to the archive's
        pip += ["--isolated"]
        source = ["--no-index", "--find-links", str(plan.wheelhouse)]
        fix = "the archive lacks a wheel pip needs: pack it again (duet pack) on the workstation"
    else:
        source = []
        fix = "check the package index is reachable (pip config list) and pip's output above"
        external(run, [*pip, "install", "--upgrade", "pip"], fix)
    if not plan.system_site:
        external(run, [*pip, "install", *source, str(plan.package)], fix)
        return
    external(run, [*pip, "install", *source, "--no-deps", str(plan.package)], fix)
    wanted = robot_requirements(installed_requires(plan.venv))
    log(f"installing duet's dependencies but {', '.join(sorted(VENDOR_KEPT))} (the system's): "
        "pip will say duet-runtime requires it; that is expected here")
    external(run, [*pip, "install", *source, *wanted], fix)


def probe_onnxruntime(plan: VenvPlan, capture: Capture, vendor: bool) -> dict[str, Any]:
    """Which onnxruntime the venv's python imports, and its providers."""
    fix = VENDOR_FIX if vendor else "check pip's output above"
    try:
        found = json.loads(capture([plan.python, "-c", PROBE]))
    except subprocess.CalledProcessError as exc:
        raise StepFailed(f"onnxruntime does not import in {plan.venv} ({exc.stderr.strip()}); "
                         f"fix: {fix}") from None
    except (OSError, ValueError) as exc:
        raise StepFailed(f"cannot ask {plan.python} for its onnxruntime ({exc}); fix: {fix}"
                         ) from None
    if not isinstance(found, dict) or not isinstance(found.get("providers"), list):
        raise StepFailed(f"{plan.python} answered {found!r} about onnxruntime; fix: {fix}")
    return found


def check_onnxruntime(found: dict[str, Any], wanted: list[str], plan: VenvPlan,
                      vendor: bool) -> None:
    """The venv's onnxruntime offers every provider the config asks for; on L4T it is the
    system's (NVIDIA's), not a copy inside the venv."""
    where = f"onnxruntime {found.get('version')} at {found.get('file')}"
    inside = Path(str(found.get("file", ""))).is_relative_to(plan.venv)
    if vendor and inside:
        raise StepFailed(f"{where} is inside the venv and shadows NVIDIA's; fix: "
                         f"{plan.venv}/bin/pip uninstall -y onnxruntime, then rerun duet install")
    missing = [p for p in wanted if p not in found["providers"]]
    if missing:
        raise StepFailed(f"{where} offers {', '.join(found['providers'])}, not "
                         f"{', '.join(missing)} that the config's bundle.onnxruntime asks for; "
                         f"fix: {VENDOR_FIX if vendor else 'set the providers to [cpu]'}")
