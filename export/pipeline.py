"""The export stage: a model contract plus the models -> a verified, optionally signed bundle.

Two entry points share every check:
- `export_bundle`: PyTorch modules (one per planner stage, and `follower`), traced to ONNX;
- `bundle_from_onnx`: ONNX files the user already has.

Per model: fp32 ONNX (onnx.checker, strict shape inference, static shapes) -> its real I/O
against the tensors the contract derives (refused naming the tensor) -> fp16 / int8 QDQ when
asked -> parity on held-out samples (recorded or given by the user, else synthesised from the
contract's roles) against the source (PyTorch outputs, or reference outputs the user gives,
else the fp32 graph itself) -> tokenizers and other files the contract names, the parity set,
a format-2 manifest with the sha256 of every file -> signature -> the robot's own
`load_bundle`. The bundle is assembled in a scratch folder next to `out` and moved into place
only when every check passed.
"""

from __future__ import annotations

import ctypes
import gc
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from export import calibration as calib
from export import onnx_files
from export.chunk_parity import ChunkParity, format_chunk
from export.onnx_export import OPSET, ExportError, check_onnx
from export.parity import (
    TOLERANCES,
    Judges,
    ParityResult,
    format_table,
    judges,
    measure,
    save_parity,
)
from export.precision import (
    QUANTIZABLE_OPS,
    WEIGHT_ONLY_BITS,
    to_fp16,
    to_int8,
    to_weight_only,
)
from export.seal import seal
from runtime.model.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    ManifestV2,
    ParitySpec,
    Provenance,
)
from runtime.model.bundle_files import ModelSpec, TensorSpec
from runtime.model.contract import Contract, InstructionInput, PrefixInput, Stage
from runtime.model.engines import check_specs
from runtime.model.engines.onnxruntime_engine import OnnxRuntimeEngine
from runtime.model.tokenizer import InstructionEncoder, TokenizerError

PARITY_FILE = "parity.npz"

# name -> fp32 ONNX file written into `work`, given the example inputs to trace with
Producer = Callable[[str, dict[str, np.ndarray], Path], None]
# name -> reference outputs [N, ...] for sample inputs [N, ...]
Reference = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray] | None]  # None: none


PRECISIONS = ("fp32", "fp16", "int8", "int8w", "int4w")


def parse_precision(text: str) -> tuple[str, dict[str, str]]:
    """`--precision`: one value for every model (`int8`), or per model
    (`prefix=int8w,expert=fp32,follower=fp32`; models not named: fp32)."""
    if "=" not in text:
        return text.strip(), {}
    per: dict[str, str] = {}
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or name in per:
            raise ExportError(f"--precision {text!r}: expected VALUE or MODEL=VALUE,... "
                              f"(each model once)")
        per[name] = value
    return "fp32", per


@dataclass
class ExportOptions:
    precision: str = "fp32"  # every model not named in `models`
    models: dict[str, str] = field(default_factory=dict)  # model -> its own precision
    # the follower's own precision (None: `precision`). A follower MLP runs in ~15 µs in
    # fp32; int8 buys it nothing and costs accuracy on the motor path.
    follower_precision: str | None = None
    int8_ops: tuple[str, ...] = QUANTIZABLE_OPS
    calib: int = 64  # calibration samples per model (int8)
    parity_samples: int = 8  # held-out samples per model, stored in the bundle
    parity_repeat: int = 5  # timed runs per parity sample (the latency columns)
    calib_data: Path | None = None  # .npz of recorded observations, keys <model>/<input>
    sign_key: Path | None = None
    seed: int = 0
    tool: str = "duet export"
    checkpoints: dict[str, str] = field(default_factory=dict)  # model -> sha256 of its source
    torch_version: str | None = None

    def precision_of(self, model: str) -> str:
        if model in self.models:
            return self.models[model]
        if model == "follower" and self.follower_precision is not None:
            return self.follower_precision
        return self.precision

    def label(self, models: list[str]) -> str:
        """For the bundle's version: the precision, or `mixed`."""
        used = {self.precision_of(m) for m in models}
        return used.pop() if len(used) == 1 else "mixed"


def load_contract(path: Path) -> Contract:
    """A contract YAML -> Contract; every failure an ExportError naming the file and key."""
    import yaml
    from pydantic import ValidationError

    from runtime.config import ConfigError, check_plain

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        check_plain(data, str(path))
        return Contract.model_validate(data)
    except OSError as exc:
        raise ExportError(f"{path}: cannot read: {exc.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError, ConfigError) as exc:
        raise ExportError(f"{path}: not a valid contract file: {exc}") from None
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                 for e in exc.errors()]
        raise ExportError(f"{path}: invalid contract:\n  " + "\n  ".join(lines)) from None


def _with_files(contract: Contract, names: dict[str, str]) -> Contract:
    """The contract with each model's `file` renamed (its name inside the bundle)."""
    data = contract.model_dump(mode="json")
    for stage in data["planner"]["stages"]:
        stage["file"] = names[stage["name"]]
        stage["precision"] = names[f"{stage['name']}:precision"]
    if data.get("follower") is not None:
        data["follower"]["file"] = names["follower"]
        data["follower"]["precision"] = names["follower:precision"]
    return Contract.model_validate(data)


def _models(contract: Contract) -> dict[str, tuple[list[TensorSpec], list[TensorSpec]]]:
    out = {s.name: contract.stage_tensors(s) for s in contract.planner.stages}
    if contract.follower is not None:
        out["follower"] = contract.follower_tensors()
    return out


def _roles(contract: Contract, stage: Stage | None, assets: Path) -> tuple[dict[str, Any], int]:
    """Tensor name -> role (and the vocabulary size of an instruction input)."""
    roles: dict[str, Any] = {}
    vocab = 2
    for i in stage.inputs if stage is not None else []:
        roles[i.name] = i.role
        if isinstance(i, InstructionInput):
            if i.mask:
                roles[i.mask] = "instruction_mask"
            try:
                enc = InstructionEncoder(i.kind, assets / i.tokenizer, i.max_len)
            except TokenizerError as exc:
                raise ExportError(f"input {i.name}: {exc}") from None
            vocab = enc.vocab_size()
        if isinstance(i, PrefixInput) and i.length:
            roles[i.length] = "prefix_length"
            roles[f"{i.length}:max"] = i.steps
    return roles, vocab


def _samples(name: str, ins: list[TensorSpec], n: int, contract: Contract, assets: Path,
             opts: ExportOptions, upstream: dict[str, np.ndarray]) -> calib.Samples:
    """Recorded observations when given, else synthesised; a stage's inputs from an earlier
    stage are that stage's outputs on the same samples (in distribution, not noise)."""
    stage = next((s for s in contract.planner.stages if s.name == name), None)
    if opts.calib_data is not None:
        return calib.load_npz(opts.calib_data, name, ins)
    roles, vocab = _roles(contract, stage, assets)
    samples = calib.synth_inputs(ins, roles, n, opts.seed, vocab)
    for i in stage.inputs if stage is not None else []:
        if i.role == "stage" and i.source in upstream:
            samples[i.name] = np.ascontiguousarray(upstream[i.source][:n],
                                                   dtype=samples[i.name].dtype)
    return samples


def _judges(roles: dict[str, str], precision: str, kind: str) -> Judges:
    tol = TOLERANCES[precision]
    return judges(roles, tol[kind], tol["relative"])


def _build(contract: Contract, out: Path, opts: ExportOptions, assets: Path,
           produce: Producer, reference: Reference | None) -> Path:
    models = list(_models(contract))
    unknown_models = sorted(set(opts.models) - set(models))
    if unknown_models:
        raise ExportError(f"--precision names {unknown_models}; the contract's models are "
                          f"{models}")
    for given in (opts.precision, opts.follower_precision, *opts.models.values()):
        if given is not None and given not in PRECISIONS:
            raise ExportError(f"precision {given!r}: expected one of {', '.join(PRECISIONS)} "
                              "(bf16: ONNX Runtime's CPU provider has no bf16 MatMul/Add/Gemm "
                              "kernels; build TensorRT engines with `duet engines build "
                              "--precision bf16` on the target instead)")
    unknown = set(opts.int8_ops) - set(QUANTIZABLE_OPS)
    if unknown or not opts.int8_ops:
        asked = ", ".join(sorted(opts.int8_ops)) or "(none)"
        raise ExportError(f"int8 op types {asked}: expected a non-empty subset of "
                          f"{', '.join(QUANTIZABLE_OPS)}")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not a bundle; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        work, staged = Path(tmp) / "work", Path(tmp) / "bundle"
        work.mkdir()
        staged.mkdir()
        results: list[ParityResult] = []
        parity: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
        names: dict[str, str] = {}
        upstream: dict[str, np.ndarray] = {}
        n_parity = opts.parity_samples
        stages = {s.name: s for s in contract.planner.stages}
        chunk = ChunkParity(contract, opts.seed, assets) if len(stages) > 1 or any(
            s.flow is not None for s in stages.values()) else None
        for name, (ins, outs) in _models(contract).items():
            kind = "follower" if name == "follower" else "planner"
            label = f"model {name}"
            # a folder per model and precision: a graph's data files keep their own names
            fp32 = work / name / "fp32" / f"{name}.onnx"
            fp32.parent.mkdir(parents=True)
            examples = calib.synth_inputs(ins, _roles(contract, None, assets)[0],
                                          calib.batch_of(ins), 0)
            produce(name, examples, fp32)
            dynamic = kind == "planner" and contract.planner.dynamic_batch
            check_onnx(fp32, label, dynamic)
            data = _samples(name, ins, opts.calib + n_parity, contract, assets, opts, upstream)
            total = calib.count(data)
            if total <= n_parity:
                raise ExportError(f"{label}: {total} observations; need more than {n_parity} "
                                  "(held-out parity samples + calibration)")
            held_out = calib.take(data, slice(total - n_parity, total))
            calibration = calib.take(data, slice(0, min(opts.calib, total - n_parity)))
            # the source's outputs first: a PyTorch source is then dropped before ONNX
            # Runtime holds the same weights (export memory)
            source = reference(name, held_out) if reference is not None else None
            _give_back_freed_memory()
            engine = OnnxRuntimeEngine(fp32, batch=calib.batch_of(ins) if dynamic else None)
            spec = ModelSpec(file=fp32.name, precision="fp32", inputs=ins, outputs=outs)
            try:
                check_specs(spec, engine, label)
            except Exception as exc:
                raise ExportError(str(exc)) from None
            fp32_out = calib.run_all(engine, data, outs)
            for t in outs:
                upstream[f"{name}.{t.name}"] = fp32_out[t.name]
            ref = source if source is not None else \
                {k: v[total - n_parity:] for k, v in fp32_out.items()}
            precision = opts.precision_of(name)
            roles = contract.output_roles(name)
            res = measure(f"{name} fp32", engine, held_out, ref, _judges(roles, "fp32", kind),
                          opts.parity_repeat)
            if chunk is not None and name in stages:
                chunk.fp32(stages[name], held_out, engine, precision != "fp32")
            final = fp32
            external = onnx_files.has_external_data(fp32) or \
                onnx_files.weight_bytes(fp32) >= onnx_files.EXTERNAL_MIN_BYTES
            if precision != "fp32":
                final = work / name / precision / f"{name}.onnx"
                final.parent.mkdir()
                batch = engine.batch
                del engine  # its weights, before the variant's are made
                _give_back_freed_memory()
                if precision == "fp16":
                    to_fp16(fp32, final, external)
                elif precision in WEIGHT_ONLY_BITS:
                    to_weight_only(fp32, final, WEIGHT_ONLY_BITS[precision], external)
                else:
                    to_int8(fp32, final, calibration, opts.int8_ops, calib.batch_of(ins),
                            external)
                engine = OnnxRuntimeEngine(final, batch=batch)
                res += measure(f"{name} {precision}", engine, held_out, ref,
                               _judges(roles, precision, kind), opts.parity_repeat)
                if chunk is not None and name in stages:
                    chunk.reduced(stages[name], held_out, engine)
            del engine
            results += res
            file = f"{name}.onnx"
            onnx_files.relocate(final, staged / file, external)
            names[name], names[f"{name}:precision"] = file, precision
            parity[name] = (held_out, ref)
        print(format_table(results, "parity vs the source, per output"))
        failed = sorted({r.model for r in results if not r.ok})
        if chunk is not None:
            # the loosest action tolerance among the planner's stage precisions
            tol = max(TOLERANCES[opts.precision_of(n)]["planner"] for n in stages)
            chunk_results = chunk.results(tol)
            print(format_chunk(chunk_results, n_parity))
            failed += [f"the planner's chunk ({r.variant})" for r in chunk_results
                       if not r.ok]
        if failed:
            raise ExportError(f"parity above tolerance for {', '.join(failed)}; no bundle written")
        final_contract = _with_files(contract, names)
        for extra in set(contract.files()) - {s.file for s in contract.planner.stages} - (
                {contract.follower.file} if contract.follower else set()):
            src = assets / extra
            if not src.is_file():
                raise ExportError(f"{src}: named by the contract but missing")
            (staged / extra).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, staged / extra)
        save_parity(staged / PARITY_FILE, parity)

        def manifest_for(files: dict[str, str], created: datetime) -> ManifestV2:
            first = files[names[contract.planner.stages[0].name]][:8]
            return ManifestV2(
                format_version=FORMAT_VERSION,
                version=f"{created:%Y%m%d-%H%M%S}-{opts.label(models)}-{first}",
                contract=final_contract,
                parity=ParitySpec(file=PARITY_FILE, max_abs={
                    name: TOLERANCES[names[f"{name}:precision"]][
                        "follower" if name == "follower" else "planner"] for name in models},
                    max_rel={name: TOLERANCES[names[f"{name}:precision"]]["relative"]
                             for name in models}),
                files=files,
                provenance=Provenance(
                    tool=opts.tool, tool_version=_version_string(), opset=OPSET,
                    torch_version=opts.torch_version,
                    onnxruntime_version=onnxruntime.__version__,
                    checkpoints=dict(opts.checkpoints),
                    created=created.isoformat(timespec="seconds")))

        return seal(staged, out, manifest_for, opts.sign_key)


def export_bundle(contract: Contract, modules: dict[str, Any], out: Path, opts: ExportOptions,
                  assets: Path) -> Path:
    """PyTorch modules (by planner stage name, and `follower`) -> bundle at `out`.

    Each module's forward takes its model's inputs in the contract's order (an instruction
    mask right after its instruction, a prefix length right after its prefix) and returns
    its outputs in order. `assets`: where the contract's other files (tokenizers) are.

    `modules` is consumed: each module leaves the dict once its reference outputs are
    recorded, so its weights are freed while ONNX Runtime holds theirs (a caller keeping
    them, or a copy of the dict, doubles the export's peak memory)."""
    import torch

    from export.onnx_export import export_onnx
    tensors = _models(contract)
    files = _model_files(contract)
    # a model without a module is the ONNX file the contract names (a torch planner beside
    # an existing ONNX follower, say)
    onnx_given = {n for n in tensors if n not in modules and (assets / files[n]).is_file()}
    unknown, missing = set(modules) - set(tensors), set(tensors) - set(modules) - onnx_given
    if unknown or missing:
        where = ", ".join(str(assets / files[n]) for n in sorted(missing))
        raise ExportError(
            f"modules {sorted(modules)} do not match the contract's models {sorted(tensors)}"
            + (f": no module and no ONNX file ({where}) for {sorted(missing)}"
               if missing else "")
            + (f"; {sorted(unknown)} are not in the contract" if unknown else ""))

    def produce(name: str, examples: dict[str, np.ndarray], path: Path) -> None:
        if name in onnx_given:
            _copy_onnx(assets / files[name], name, path)
            return
        ins, outs = tensors[name]
        args = tuple(torch.from_numpy(examples[t.name]) for t in ins)
        export_onnx(modules[name], args, [t.name for t in ins], [t.name for t in outs], path,
                    f"model {name}", name != "follower" and contract.planner.dynamic_batch)

    def reference(name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The module's outputs, in batches of the size it was exported with; the module is
        then dropped from `modules` (called once per model: its weights need not outlive
        it while ONNX Runtime holds theirs)."""
        if name in onnx_given:
            return None  # its own fp32 graph is the reference
        ins, outs = tensors[name]
        results: dict[str, list[np.ndarray]] = {t.name: [] for t in outs}
        module = modules.pop(name)
        with torch.no_grad():
            for feeds, real in calib.batches(inputs, calib.batch_of(ins)):
                got = module(*(torch.from_numpy(feeds[t.name]) for t in ins))
                got = got if isinstance(got, (tuple, list)) else (got,)
                for t, g in zip(outs, got, strict=True):
                    results[t.name].append(g.detach().numpy()[:real].astype(np.float64))
        return {k: np.concatenate(v) for k, v in results.items()}

    opts.torch_version = opts.torch_version or str(torch.__version__)
    return _build(contract, out, opts, assets, produce, reference)


def bundle_from_onnx(contract: Contract, out: Path, opts: ExportOptions, assets: Path,
                     reference_data: Path | None = None) -> Path:
    """ONNX files the contract names (relative to `assets`) -> bundle at `out`.

    `reference_data`: an .npz with `<model>/in/<input>` and `<model>/out/<output>` arrays
    the models must reproduce (from the training framework); without it parity compares a
    reduced precision against the fp32 graph itself."""
    files = _model_files(contract)

    def produce(name: str, examples: dict[str, np.ndarray], path: Path) -> None:
        _copy_onnx(assets / files[name], name, path)

    reference = None
    if reference_data is not None:
        from export.parity import load_parity

        given = load_parity(reference_data)
        opts.calib_data = opts.calib_data or reference_data

        def reference(name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if name not in given:
                raise ExportError(f"{reference_data}: no reference outputs for model {name}")
            outs = given[name][1]
            n = len(next(iter(inputs.values())))
            return {k: v[-n:].astype(np.float64) for k, v in outs.items()}

    return _build(contract, out, opts, assets, produce, reference)


def _model_files(contract: Contract) -> dict[str, str]:
    files = {s.name: s.file for s in contract.planner.stages}
    if contract.follower is not None:
        files["follower"] = contract.follower.file
    return files


def _copy_onnx(src: Path, name: str, path: Path) -> None:
    """A user's ONNX file into the work folder, with the data files it names."""
    if not src.is_file():
        raise ExportError(f"{src}: the ONNX file of model {name} is missing")
    try:
        onnx_files.relocate(src, path)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{src}: cannot read model {name} and its external data: "
                          f"{exc}") from None


def _give_back_freed_memory() -> None:
    """Hand the heap freed by a dropped PyTorch module or engine back to the OS: glibc keeps
    freed blocks under its mmap threshold (up to 32 MB: most weight matrices) in the heap, so
    the RSS would not fall while the next step loads the same weights again."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim this way


def _version_string() -> str:
    try:
        return metadata.version("duet-runtime")
    except metadata.PackageNotFoundError:
        return "unknown"
