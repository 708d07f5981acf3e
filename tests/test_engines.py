"""Engines: ONNX Runtime with I/O binding agrees with session.run; TensorRT module type-checks."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_export import export_tiny

from runtime.model.bundle import Bundle, TensorSpec, load_bundle
from runtime.model.engines import EngineError, make_engine
from runtime.model.engines.onnxruntime_engine import OnnxRuntimeEngine
from runtime.model.engines.tensorrt_engine import check_trusted, engine_cache_key

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return load_bundle(export_tiny(tmp_path_factory.mktemp("engines") / "b", "int8"))


def _random_feeds(specs: list[TensorSpec], rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for s in specs:
        if s.dtype == "float32":
            feeds[s.name] = rng.normal(0, 1, s.shape).astype(np.float32)
        else:
            feeds[s.name] = rng.integers(0, 30, s.shape).astype(s.dtype)
    return feeds


@pytest.mark.parametrize("model", ["planner", "follower"])
def test_iobinding_engine_matches_session_run(bundle: Bundle, model: str) -> None:
    path = bundle.path / bundle.model_specs()[model].file
    engine = OnnxRuntimeEngine(path)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for _ in range(5):
        feeds = _random_feeds(engine.input_specs, rng)
        expected = plain.run(None, feeds)
        got = engine.run(feeds)
        for spec, want in zip(engine.output_specs, expected, strict=True):
            np.testing.assert_array_equal(got[spec.name], want)


def test_outputs_are_preallocated_and_overwritten(bundle: Bundle) -> None:
    engine = make_engine(bundle.model_specs()["follower"], bundle)
    rng = np.random.default_rng(2)
    first = engine.run(_random_feeds(engine.input_specs, rng))
    residual = first["residual"]
    snapshot = residual.copy()
    second = engine.run(_random_feeds(engine.input_specs, rng))
    assert second["residual"] is residual  # same buffer: nothing allocated for the caller
    assert not np.array_equal(residual, snapshot)  # ...and it holds the new result


def test_feeds_broadcast_and_cast_like_copyto(bundle: Bundle) -> None:
    engine = make_engine(bundle.model_specs()["follower"], bundle)
    rng = np.random.default_rng(3)
    feeds = _random_feeds(engine.input_specs, rng)
    expected = engine.run(feeds)["residual"].copy()
    unbatched = {k: v[0].astype(np.float64) for k, v in feeds.items()}  # [8,6]/[6], float64
    np.testing.assert_allclose(engine.run(unbatched)["residual"], expected, atol=1e-6)


def test_bad_feeds_raise_engine_error(bundle: Bundle) -> None:
    engine = make_engine(bundle.model_specs()["planner"], bundle)
    feeds = _random_feeds(engine.input_specs, np.random.default_rng(4))
    with pytest.raises(EngineError, match=r"missing input 'tokens'"):
        engine.run({k: v for k, v in feeds.items() if k != "tokens"})
    with pytest.raises(EngineError, match=r"bad input"):
        engine.run({**feeds, "tokens": feeds["tokens"].astype(np.float32)})  # float -> int64
    with pytest.raises(EngineError, match=r"bad input"):
        engine.run({**feeds, "q": np.zeros((1, 7), np.float32)})


def test_engine_must_match_the_manifest(bundle: Bundle) -> None:
    spec = bundle.model_specs()["follower"]
    lying = spec.model_copy(update={"outputs": [TensorSpec(name="residual", dtype="float32",
                                                           shape=[1, 7])]})
    with pytest.raises(EngineError, match=r"output 'residual': the contract gives "
                                          r"float32\[1, 7\], the model has float32\[1, 6\]"):
        make_engine(lying, bundle)


def test_unloadable_model_raises_engine_error(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(EngineError, match=r"bad.onnx: ONNX Runtime cannot load it"):
        OnnxRuntimeEngine(tmp_path / "bad.onnx")


def test_an_engine_from_an_untrusted_cache_is_refused(tmp_path: Path) -> None:
    """TensorRT plans are code: only from a cache root (or the service user) owns and
    nobody else can write, and only with the sha256 recorded when they were built."""
    cache = tmp_path / "engines"
    cache.mkdir(mode=0o755)
    plan = cache / "m.plan"
    plan.write_bytes(b"serialized engine")
    cache.chmod(0o755)  # explicit: an earlier test's umask may linger in this process
    plan.chmod(0o644)
    (cache / "m.plan.sha256").write_text(hashlib.sha256(b"serialized engine").hexdigest())
    check_trusted(plan)  # owned by this user, 0644: fine
    plan.write_bytes(b"planted engine")
    with pytest.raises(EngineError, match=r"sha256 differs from the one recorded"):
        check_trusted(plan)
    plan.write_bytes(b"serialized engine")
    cache.chmod(0o777)
    with pytest.raises(EngineError, match=r"writable by nobody else"):
        check_trusted(plan)
    cache.chmod(0o755)
    (cache / "m.plan.sha256").unlink()
    with pytest.raises(EngineError, match=r"m.plan.sha256: missing"):
        check_trusted(plan)


def test_tensorrt_kind_without_tensorrt_is_a_clear_error(bundle: Bundle) -> None:
    with pytest.raises(EngineError, match=r"TensorRT is not installed"):
        make_engine(bundle.model_specs()["planner"], bundle, "tensorrt")


def test_engine_cache_key_separates_precision_tensorrt_and_gpu() -> None:
    sha = "ab" * 32
    keys = {
        engine_cache_key(sha, "fp16", "10.3.0", "Orin (nvgpu)"),
        engine_cache_key(sha, "int8", "10.3.0", "Orin (nvgpu)"),
        engine_cache_key(sha, "fp16", "10.7.0", "Orin (nvgpu)"),
        engine_cache_key(sha, "fp16", "10.3.0", "NVIDIA GeForce RTX 4090"),
    }
    assert len(keys) == 4
    assert all(re.fullmatch(r"[A-Za-z0-9.\-]+\.plan", k) for k in keys)


def _repaired_tensorrt_stubs(dst: Path) -> None:
    """tensorrt-stubs 10.8-10.13 ship .pyi files that do not parse (parameters named `in`,
    a non-default parameter after defaults). Copy them and repair exactly those lines."""
    import tensorrt_bindings

    src = Path(next(iter(tensorrt_bindings.__path__)))
    shutil.copytree(src, dst / "tensorrt_bindings")
    shutil.copytree(src.parent / "tensorrt", dst / "tensorrt")
    pyi = dst / "tensorrt_bindings" / "tensorrt.pyi"
    text = re.sub(r"([(,] *)in:", r"\1in_:", pyi.read_text())
    text = text.replace(", channel_axis: int)", ", channel_axis: int = ...)")
    pyi.write_text(text)


@pytest.mark.system
def test_tensorrt_modules_typecheck_against_tensorrt_stubs(tmp_path: Path) -> None:
    _repaired_tensorrt_stubs(tmp_path / "stubs")
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\npython_version = 3.10\ncheck_untyped_defs = True\nplugins = pydantic.mypy\n"
        f"mypy_path = {tmp_path / 'stubs'}\n"
        "[mypy-cuda,cuda.*,onnxruntime,onnxruntime.*,tensorrt_libs]\n"
        "ignore_missing_imports = True\n"
        # Errors inside the stubs themselves are not ours to fix; uses of them are checked.
        "[mypy-tensorrt,tensorrt_bindings.*]\nignore_errors = True\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config),
         "--cache-dir", str(tmp_path / "cache"),
         "runtime/model/engines/tensorrt_engine.py", "export/tensorrt_build.py"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Success" in run.stdout
