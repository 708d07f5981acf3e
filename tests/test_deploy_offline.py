"""`duet pack` and `duet install --offline`, for real: pip downloads the wheels from the package
index here (the workstation's role), then the install runs inside a network namespace with no
interface up, into a staging root, and the venv it made runs duet. The host's platform is
packed for that (an aarch64 wheelhouse cannot install here outside emulation); the aarch64
pack is checked separately, wheel by wheel, against the target's tags."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import uuid
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from runtime.deploy.archive import Target, host_target
from runtime.deploy.venv import robot_requirements

REPO = Path(__file__).resolve().parents[1]
# installs into network namespaces, from archives it builds: a system test, and a long one
pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]


def _robot_config(tmp: Path) -> Path:
    data = yaml.safe_load((REPO / "configs/sim.yaml").read_text())
    data["bus"]["device"] = "/dev/ttyDUET0"
    data.pop("sim")
    data["bundle"]["path"] = str(REPO / "bundles/reference")
    path = tmp / "robot.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _duet(*args: str, env: dict[str, str] | None = None, netns: str | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "runtime.cli", *args]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _pack(tmp: Path, target: Target) -> tuple[Path, dict]:
    out = tmp / f"duet-{target.label}.tar.gz"
    done = _duet("pack", "--platform", target.machine, "--python", target.python,
                 "--glibc", target.glibc, "--config", str(_robot_config(tmp)), "--bundle",
                 str(REPO / "bundles/reference"), "--out", str(out), "--json",
                 env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout)


@pytest.fixture(scope="module")
def host_pack(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return _pack(tmp_path_factory.mktemp("pack-host"), host_target())


@pytest.fixture(scope="module")
def aarch64_pack(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return _pack(tmp_path_factory.mktemp("pack-arm"), Target("aarch64", "3.10", "2.35"))


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace with no interface up: no network at all."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns)")
    name = f"duet-offline-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        links = subprocess.run(["ip", "netns", "exec", name, "ip", "-o", "link"],
                               capture_output=True, text=True, check=True).stdout
        assert [ln.split(":")[1].strip() for ln in links.splitlines()] == ["lo"]
        assert "state DOWN" in links  # not even loopback
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """No pip configuration, no PIP_* variables, no index: only what the archive brings."""
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home),
            "PIP_CONFIG_FILE": os.devnull, "PYTHONPATH": str(REPO), **extra}


def _installed(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the staged venv's python as a service would: no PYTHONPATH, no user site."""
    return subprocess.run([str(root / "opt/duet/venv/bin/python"), "-I", *args],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
                          timeout=300)


def test_offline_install_without_network(host_pack: tuple[Path, dict], netns: str,
                                         tmp_path: Path) -> None:
    """The commands `duet pack` prints for the robot, as printed (in this test's folder
    rather than /tmp, staged with --root): a bootstrap duet from the archive's wheels alone,
    then the install."""
    archive, manifest = host_pack
    root = tmp_path / "root"
    untar, venv, install = (re.sub(r"/tmp\b", str(tmp_path), line)
                            for line in manifest["bootstrap"])
    assert untar.startswith("tar -xzf ") and install.startswith("sudo ")
    env = _clean_env(tmp_path)
    del env["PYTHONPATH"]  # the bootstrap duet is its own
    for line in (untar, venv):
        cmd = ["ip", "netns", "exec", netns, "sh", "-c", line]
        done = subprocess.run(cmd, cwd=archive.parent, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, (line, done.stderr[-3000:])
    cmd = ["ip", "netns", "exec", netns, *shlex.split(install.removeprefix("sudo ")),
           "--root", str(root), "--json"]
    done = subprocess.run(cmd, cwd=archive.parent, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "files verified (sha256)" in done.stderr  # --json: progress on stderr
    result = json.loads(done.stdout)
    assert result["offline"] and result["l4t"] is None
    assert result["onnxruntime"]["file"].startswith(str(root / "opt/duet/venv"))
    # the venv holds duet's wheel itself, and runs the robot code without torch
    version = _installed(root, "-m", "runtime.cli", "--version")
    assert version.stdout.split() == ["duet", manifest["duet"]], version.stderr
    probe = _installed(root, "-c", "import sys, runtime.follower.process, runtime.planner.process, "
                       "drivers.dynamixel; print('torch' in sys.modules)")
    assert probe.stdout.strip() == "False", probe.stderr
    # the installed bundle passes its parity check with the offline-installed runtime
    current = root / "var/lib/duet/bundles/current"
    check = subprocess.run(["ip", "netns", "exec", netns, str(root / "opt/duet/venv/bin/duet"),
                            "export", "check", str(current)], capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin"}, timeout=300)
    assert check.returncode == 0 and check.stdout.strip().endswith("PASS"), check.stdout
    cfg = yaml.safe_load((root / "etc/duet/duet.yaml").read_text())
    assert cfg["bus"]["device"] == "/dev/ttyDUET0"  # the archive's config
    assert (root / "etc/systemd/system/duet-follower.service").is_file()


def _fake_vendor_runtime(tmp: Path) -> Path:
    """What NVIDIA's wheel puts in the system site-packages, reduced to what install asks of
    it: a distribution named onnxruntime-gpu providing the module onnxruntime."""
    site = tmp / "vendor-site"
    (site / "onnxruntime").mkdir(parents=True)
    (site / "onnxruntime/__init__.py").write_text(
        "__version__ = '1.19.0'\n"
        "def get_available_providers():\n"
        "    return ['TensorrtExecutionProvider', 'CUDAExecutionProvider', "
        "'CPUExecutionProvider']\n")
    info = site / "onnxruntime_gpu-1.19.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\n"
                                   "Version: 1.19.0\n")
    (info / "top_level.txt").write_text("onnxruntime\n")
    return site


def _jetson_root(tmp: Path) -> Path:
    root = tmp / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
        "DATE: Wed Jan  8 01:49:37 UTC 2025\n")
    return root


def test_offline_install_on_jetson_keeps_the_vendor_onnxruntime(
        host_pack: tuple[Path, dict], netns: str, tmp_path: Path) -> None:
    """L4T detected from the staged /etc/nv_tegra_release: the venv sees the system
    site-packages and gets every dependency from the archive but onnxruntime, whose wheel is
    in the archive and stays unused; the onnxruntime the venv imports is the vendor's."""
    archive, _ = host_pack
    root = _jetson_root(tmp_path)
    vendor = _fake_vendor_runtime(tmp_path)
    done = _duet("install", "--offline", str(archive), "--root", str(root), "--json",
                 env=_clean_env(tmp_path, PYTHONPATH=f"{vendor}:{REPO}"), netns=netns)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["l4t"] == "R36.4.3" and result["jetpack"] == "6"
    assert result["onnxruntime"]["dists"] == ["onnxruntime-gpu"]
    assert result["onnxruntime"]["file"] == str(vendor / "onnxruntime/__init__.py")
    venv = root / "opt/duet/venv"
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    site = next(venv.glob("lib/python*/site-packages"))
    assert not list(site.glob("onnxruntime*")), "PyPI's onnxruntime went into the venv"
    assert list(site.glob("duet_runtime-*.dist-info")) and list(site.glob("zmq"))
    assert "pip will say duet-runtime requires it" in done.stderr
    cfg = yaml.safe_load((root / "etc/duet/site.yaml").read_text())
    assert cfg["bundle"]["onnxruntime"]["planner_providers"] == ["tensorrt", "cuda", "cpu"]


def test_jetson_without_the_vendor_runtime_rolls_back(host_pack: tuple[Path, dict],
                                                      tmp_path: Path) -> None:
    archive, _ = host_pack
    root = _jetson_root(tmp_path)
    done = _duet("install", "--offline", str(archive), "--root", str(root),
                 env=_clean_env(tmp_path))
    assert done.returncode == 1
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith("duet install: ") and "fix: install NVIDIA's onnxruntime-gpu" in err
    assert err.endswith("nothing enabled")
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        "etc", "etc/nv_tegra_release"]  # the venv and every file rolled back


def _repack(src: Path, dst: Path, change: object) -> None:
    """Unpack a real archive, apply `change` to its folder, pack it again."""
    work = dst.parent / "work"
    with tarfile.open(src) as tar:
        tar.extractall(work, filter="data")
    (top,) = work.iterdir()
    change(top)  # type: ignore[operator]
    with tarfile.open(dst, "w:gz", compresslevel=1) as tar:
        tar.add(top, arcname=top.name)
    shutil.rmtree(work)


@pytest.mark.parametrize("case", ["wheel changed", "file added", "link", "outside",
                                  "sha256", "platform", "not a tar"])
def test_a_bad_archive_installs_nothing(case: str, host_pack: tuple[Path, dict],
                                        tmp_path: Path) -> None:
    archive, _ = host_pack
    bad = tmp_path / "bad.tar.gz"
    extra: list[str] = []
    if case == "wheel changed":
        def flip(top: Path) -> None:
            wheel = next((top / "wheels").glob("numpy-*.whl"))
            data = bytearray(wheel.read_bytes())
            data[len(data) // 2] ^= 0xFF
            wheel.write_bytes(bytes(data))
        _repack(archive, bad, flip)
        expect = r"wheels/numpy-.*\.whl does not match its sha256 in manifest.json"
    elif case == "file added":
        _repack(archive, bad, lambda top: (top / "wheels/evil-1.0-py3-none-any.whl"
                                           ).write_bytes(b"PK"))
        expect = r"wheels/evil-1.0-py3-none-any.whl is not in manifest.json files"
    elif case in ("link", "outside"):
        with tarfile.open(bad, "w:gz") as tar:
            info = tarfile.TarInfo("duet-x/source" if case == "link" else "../etc/passwd")
            if case == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc"
                tar.addfile(info)
            else:
                tar.addfile(info, None)
        expect = "is not a plain file" if case == "link" else "points outside"
    elif case == "not a tar":
        bad.write_bytes(b"\x1f\x8b" + os.urandom(4096))  # gzip magic, then noise
        expect = r"bad.tar.gz: not a readable archive \(.*\); make one with duet pack"
    elif case == "sha256":
        bad = archive
        extra = ["--sha256", "0" * 64]
        expect = "sha256 is not the expected"
    else:
        arm = Target("aarch64", "3.10")

        def retarget(top: Path) -> None:
            manifest = json.loads((top / "manifest.json").read_text())
            manifest["target"].update(machine=arm.machine, python=arm.python)
            (top / "manifest.json").write_text(json.dumps(manifest))
        _repack(archive, bad, retarget)
        host = host_target()
        expect = (f"packed for aarch64 Python 3.10; this machine is {host.machine} Python "
                  f"{host.python}: on the workstation run duet pack --platform {host.machine}")
    root = tmp_path / "root"
    done = _duet("install", "--offline", str(bad), *extra, "--root", str(root),
                 env=_clean_env(tmp_path))
    assert done.returncode == 2, done.stderr
    assert re.search(expect, done.stderr), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one line
    assert not root.exists()


def test_aarch64_pack_has_a_wheel_for_every_robot_dependency(
        aarch64_pack: tuple[Path, dict]) -> None:
    """`duet pack --platform aarch64 --python 3.10`: every wheel installs on JetPack 6
    (CPython 3.10, manylinux up to glibc 2.35, aarch64), every robot dependency of duet is
    among them, torch is not."""
    archive, manifest = aarch64_pack
    assert manifest["target"] == {"machine": "aarch64", "python": "3.10", "glibc": "2.35"}
    platforms = ["linux_aarch64"] + [f"manylinux_2_{m}_aarch64" for m in range(17, 36)] + [
        "manylinux2014_aarch64"]
    supported = set(cpython_tags((3, 10), platforms=platforms)) | set(
        compatible_tags((3, 10), "cp310", platforms=platforms))
    wheels = [f for f in manifest["files"] if f.startswith("wheels/")]
    names = set()
    native = 0
    for rel in wheels:
        name, _, _, tags = parse_wheel_filename(Path(rel).name)
        assert tags & supported, f"{rel} does not install on aarch64 CPython 3.10"
        names.add(name)
        native += any(t.platform != "any" for t in tags)
    assert native >= 10  # numpy, onnxruntime, pyzmq, pydantic-core, cryptography, ...
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(manifest["wheel"]))
        wheel = tar.extractfile(member)
        assert wheel is not None
        with zipfile.ZipFile(io.BytesIO(wheel.read())) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            requires = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist")
    deps = {canonicalize_name(Requirement(r).name)
            for r in robot_requirements(requires, frozenset())}
    assert "onnxruntime" in deps and "numpy" in deps
    assert deps <= names, f"no wheel for {sorted(deps - names)}"
    assert "torch" not in names
