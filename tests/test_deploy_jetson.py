"""The Jetson path, staged: a tree with a copied /etc/nv_tegra_release and JetPack's tools
(nvpmodel, jetson_clocks) as real executables on PATH that print what the real ones print.
No Jetson, GPU, TensorRT or NVIDIA onnxruntime here: what those would do is not tested."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import onnxruntime as ort
import pytest
import yaml
from onnx_bundle import make_bundle

from runtime.cli import main
from runtime.config import load_config
from runtime.deploy import jetson
from runtime.deploy.doctor import diagnose
from runtime.deploy.host_checks import FAIL, OK, WARN, Check
from runtime.model.engines import EngineError, engine_options, make_engine
from runtime.model.engines.onnxruntime_engine import (
    OnnxRuntimeEngine,
    ort_cache_dir,
    prepare_engine_cache,
)

REPO = Path(__file__).resolve().parents[1]
# The first line as JetPack 6.2 (L4T R36.4.3) writes it.
R36 = ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
       "DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n"
       "TARGET_USERSPACE_LIB_DIR=nvidia\n"
       "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n")
R35 = ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
       "DATE: Tue Aug  1 19:57:35 UTC 2023\n")
CLOCKS_OFF = """SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit
Online CPUs: 0-11
cpu0: Online=1 Governor=schedutil MinFreq=115200 MaxFreq=2201600 CurrentFreq=729600 IdleStates: WFI=1 c7=1
cpu1: Online=1 Governor=schedutil MinFreq=115200 MaxFreq=2201600 CurrentFreq=1497600 IdleStates: WFI=1 c7=1
cpu11: Online=0 Governor=schedutil MinFreq=115200 MaxFreq=2201600 CurrentFreq=115200 IdleStates: WFI=1 c7=1
GPU MinFreq=306000000 MaxFreq=1300500000 CurrentFreq=306000000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=2133000000 FreqOverride=0
FAN Dynamic Speed control=active hwmon4_pwm=71
NV Power Mode: MAXN
"""  # noqa: E501
CLOCKS_ON = """SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit
Online CPUs: 0-11
cpu0: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
cpu1: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1
NV Power Mode: MAXN
"""  # noqa: E501


def test_l4t_release_read_from_the_tree(tmp_path: Path) -> None:
    assert jetson.l4t_release(tmp_path) is None  # not a Jetson
    (tmp_path / "etc").mkdir()
    release = tmp_path / "etc/nv_tegra_release"
    for text, name, jetpack in ((R36, "R36.4.3", "6"), (R35, "R35.4.1", "5"),
                                ("garbage\x00\xff" * 1000, "unknown", None), ("", "unknown", None)):
        release.write_text(text, errors="surrogateescape")
        found = jetson.l4t_release(tmp_path)
        assert found is not None and found.name == name and found.jetpack == jetpack
    release.write_text(R36)
    assert str(jetson.l4t_release(tmp_path)) == "L4T R36.4.3 (JetPack 6), board generic"


def test_power_mode_and_clocks_parsed() -> None:
    assert jetson.parse_nvpmodel("NV Power Mode: MAXN\n0\n") == jetson.PowerMode("MAXN", 0)
    mode = jetson.parse_nvpmodel("NVPM WARN: fan mode is not set!\nNV Power Mode: 15W\n1\n")
    assert mode == jetson.PowerMode("15W", 1) and not mode.is_max
    assert jetson.PowerMode("MAXN_SUPER", 2).is_max
    assert jetson.parse_nvpmodel("nvpmodel: command failed\n") is None
    off = jetson.parse_jetson_clocks(CLOCKS_OFF)
    assert off is not None and not off.pinned and off.loose == ("cpu0", "cpu1", "GPU")
    on = jetson.parse_jetson_clocks(CLOCKS_ON)
    assert on is not None and on.pinned
    assert jetson.parse_jetson_clocks("Error: jetson_clocks must be run as root\n") is None


def _robot_config(tmp: Path, **bundle_extra: object) -> Path:
    data = yaml.safe_load((REPO / "configs/sim.yaml").read_text())
    data["bus"]["device"] = "/dev/ttyDUET0"
    data.pop("sim")
    data["bundle"].update(bundle_extra)
    path = tmp / "robot.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _jetson_root(tmp: Path) -> Path:
    root = tmp / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text(R36)
    return root


def _fake_tools(tmp: Path, monkeypatch: pytest.MonkeyPatch, nvpmodel: str, clocks: str,
                clocks_rc: int = 0) -> None:
    """nvpmodel and jetson_clocks as real executables first on PATH."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text, rc in (("nvpmodel", nvpmodel, 0), ("jetson_clocks", clocks, clocks_rc)):
        (bin_dir / f"{name}.out").write_text(text)
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\ncat '{bin_dir}/{name}.out'\nexit {rc}\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_staged_jetson_install_plans_the_gpu_providers(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    root = _jetson_root(tmp_path)
    rc = main(["install", "--root", str(root), "--no-venv", "--json", "--config",
               str(_robot_config(tmp_path)), "--bundle", str(make_bundle(tmp_path / "b"))])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["l4t"] == "R36.4.3" and result["jetpack"] == "6"
    cfg = load_config(root / "etc/duet/duet.yaml", root / "etc/duet/site.yaml")
    assert cfg.bundle.onnxruntime.planner_providers == ["tensorrt", "cuda", "cpu"]
    assert cfg.bundle.onnxruntime.follower_providers == ["cpu"]  # the loop stays on the CPU
    trt, cuda, cpu = engine_options(cfg.bundle, "planner")["providers"]
    assert trt[0] == "TensorrtExecutionProvider" and cuda == ("CUDAExecutionProvider",
                                                              {"device_id": "0"})
    assert cpu == "CPUExecutionProvider"
    cache = ort_cache_dir("/var/lib/duet/engines")
    assert cache.parent == Path("/var/lib/duet/engines/onnxruntime")
    assert cache.name.startswith(f"ort{ort.__version__}-trt")
    assert trt[1] == {"device_id": "0", "trt_fp16_enable": "True",
                      "trt_max_workspace_size": str(1024 << 20),
                      "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                      "trt_timing_cache_enable": "True"}
    assert engine_options(cfg.bundle, "follower")["providers"] == ["CPUExecutionProvider"]
    # the units grant the planner the cache; tmpfiles makes it for the duet user
    assert "/var/lib/duet/engines" in (root / "etc/systemd/system/duet-planner.service"
                                       ).read_text()
    assert "d /var/lib/duet/engines 0770 duet duet" in (root / "etc/tmpfiles.d/duet.conf"
                                                         ).read_text()


def test_robot_config_providers_win_and_other_machines_stay_on_cpu(tmp_path: Path) -> None:
    own = _robot_config(tmp_path, onnxruntime={"planner_providers": ["cuda", "cpu"],
                                               "trt_fp16": False})
    root = _jetson_root(tmp_path)
    assert main(["install", "--root", str(root), "--no-venv", "--config", str(own)]) == 0
    cfg = load_config(root / "etc/duet/duet.yaml", root / "etc/duet/site.yaml")
    assert cfg.bundle.onnxruntime.planner_providers == ["cuda", "cpu"]
    assert "onnxruntime" not in (root / "etc/duet/site.yaml").read_text()
    plain = tmp_path / "plain"
    assert main(["install", "--root", str(plain), "--no-venv", "--config",
                 str(_robot_config(tmp_path))]) == 0
    cfg = load_config(plain / "etc/duet/duet.yaml", plain / "etc/duet/site.yaml")
    assert cfg.bundle.onnxruntime.planner_providers == ["cpu"]


def _levels(checks: list[Check], name: str) -> list[tuple[str, str]]:
    return [(c.level, c.detail) for c in checks if c.name == name]


def test_doctor_on_a_staged_jetson(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Power mode, clocks and providers, from the tools' own output; this onnxruntime (PyPI,
    CPU) offers no TensorRT, so the planner's providers fail with the fix."""
    root = _jetson_root(tmp_path)
    bundle = make_bundle(tmp_path / "b")
    assert main(["install", "--root", str(root), "--no-venv", "--config",
                 str(_robot_config(tmp_path, path=str(bundle)))]) == 0
    config, site = root / "etc/duet/duet.yaml", root / "etc/duet/site.yaml"
    site.write_text(site.read_text().replace("path: /var/lib/duet/bundles/current",
                                             f"path: {bundle}"))
    _fake_tools(tmp_path, monkeypatch, "NVPM WARN: fan mode is not set!\nNV Power Mode: 15W\n1\n",
                CLOCKS_OFF)
    checks = diagnose(config, site, str(tmp_path / "run"))
    assert _levels(checks, "jetson") == [(OK, "L4T R36.4.3 (JetPack 6), board generic")]
    assert _levels(checks, "power mode") == [(WARN, "15W (mode 1)")]
    assert _levels(checks, "jetson_clocks") == [
        (WARN, "scaling (cpu0, cpu1, GPU): jetson_clocks off")]
    assert any(c.name == "onnxruntime" and c.level == WARN and "CPU-only" in c.detail
               for c in checks)
    providers = _levels(checks, "providers")
    assert providers[0][0] == FAIL and "planner_providers asks for tensorrt, cuda" in \
        providers[0][1]
    assert providers[1] == (OK, "follower: cpu")
    engine = _levels(checks, "engine")[0]
    assert engine[0] == OK and ", ".join(ort.get_available_providers()) in engine[1]

    _fake_tools(tmp_path, monkeypatch, "NV Power Mode: MAXN\n0\n", CLOCKS_ON)
    checks = diagnose(config, site, str(tmp_path / "run"))
    assert _levels(checks, "power mode") == [(OK, "MAXN (mode 0)")]
    assert _levels(checks, "jetson_clocks") == [(OK, "pinned at maximum (jetson_clocks on)")]
    _fake_tools(tmp_path, monkeypatch, "NV Power Mode: MAXN\n0\n", "", clocks_rc=1)
    checks = diagnose(config, site, str(tmp_path / "run"))
    level, detail = _levels(checks, "jetson_clocks")[0]
    assert level == WARN and "needs root" in detail
    assert any(c.fix == "sudo duet doctor" for c in checks if c.name == "jetson_clocks")


def test_no_jetson_checks_off_a_jetson(tmp_path: Path) -> None:
    config = _robot_config(tmp_path, path=str(make_bundle(tmp_path / "b")))
    names = {c.name for c in diagnose(config, None, str(tmp_path / "run"))}
    assert not names & {"jetson", "power mode", "jetson_clocks", "onnxruntime"}
    assert "providers" in names


def test_a_missing_provider_refuses_the_engine(tmp_path: Path) -> None:
    """Never ONNX Runtime's silent fall-back to the CPU: the start fails naming the provider
    and what this onnxruntime offers."""
    from runtime.model.bundle import load_bundle

    bundle = load_bundle(make_bundle(tmp_path / "b"))
    spec = bundle.model_specs()["planner"]
    cfg = load_config(_robot_config(tmp_path, onnxruntime={
        "planner_providers": ["tensorrt", "cuda", "cpu"]}, engine_cache=str(tmp_path / "e")))
    with pytest.raises(EngineError) as exc:
        make_engine(spec, bundle, **engine_options(cfg.bundle, "planner"))
    text = str(exc.value)
    assert "TensorrtExecutionProvider, CUDAExecutionProvider asked for" in text
    assert f"offers only {', '.join(ort.get_available_providers())}" in text
    assert "onnxruntime-gpu" in text
    assert not (tmp_path / "e").exists()  # refused before anything was made
    eng = make_engine(spec, bundle, **engine_options(cfg.bundle, "follower"))
    assert isinstance(eng, OnnxRuntimeEngine) and eng.providers == ["CPUExecutionProvider"]


def test_tensorrt_cache_folder_is_private(tmp_path: Path) -> None:
    cache = tmp_path / "engines/onnxruntime/ortX-trtY"
    args = [("TensorrtExecutionProvider", {"trt_engine_cache_path": str(cache)})]
    prepare_engine_cache(args)
    assert cache.is_dir() and cache.stat().st_mode & 0o777 == 0o750
    cache.chmod(0o770)  # an operator in the group could plant an engine
    with pytest.raises(EngineError, match="writable by nobody else"):
        prepare_engine_cache(args)
    cache.chmod(stat.S_IRWXU)
    prepare_engine_cache(args)
