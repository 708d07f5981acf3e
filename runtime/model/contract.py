"""The model contract: the only place that says what a bundle's models take and give.

Inputs are declared by *role*, and the runtime derives from the role what to feed:

- `camera`: a named robot camera, resized, laid out (HWC / NCHW), typed and normalised as
  declared (or raw uint8 when the graph normalises itself);
- `proprio`: q, dq, effort (or q_cmd, what the follower commands), for a subset of joints,
  with an optional history (length and spacing);
- `instruction` (+ an optional attention mask): token ids from the bundle's tokenizer, duet's
  word tokenizer or a Hugging Face `tokenizers` JSON;
- `prefix` (+ an optional valid-length): the part of the current plan that will execute while
  the planner thinks, in the model's action space (real-time chunking);
- `noise` and `flow_time`: the state and time of a flow-matching head, integrated by the
  runtime (Euler, K steps);
- `stage`: an output of an earlier stage (an encoder run once, a decoder run K times);
- `carry` and `position`: a loop stage's (autoregressive tokens over a fixed-size KV buffer):
  an input that takes an output of the step before (the first step: an earlier stage's
  output, or a fill value), and the step's position;
- follower: `reference` (the look-ahead window of the interpolated plan) and proprio.

A planner is one or more stages; the last one yields the action chunk [H, D] -- absolute joint
positions or deltas from the observed q, with optional per-joint normalisation statistics --
for named joints, mapped onto the robot's by name (a bundle may drive a subset; the others
hold). Tensor names, dtypes and shapes follow from the roles (`tensors()`), so the engine's
real I/O is checked against the contract, not against a second hand-written list.

The same schema is what a user writes in a contract YAML (`duet export`, `duet bundle
create`) and what a format-2 manifest carries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.model.bundle_files import BundleFile, Precision, TensorSpec

Name = Annotated[str, Field(min_length=1, max_length=128)]
Joints = Annotated[list[Name], Field(min_length=1, max_length=64)]
Stats = Annotated[list[float], Field(min_length=1, max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ------------------------------------------------------------------------ planner inputs
class CameraInput(_Strict):
    role: Literal["camera"]
    name: Name
    camera: Name  # the robot camera that feeds it (a `planner.cameras` key)
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    layout: Literal["HWC", "NCHW"] = "HWC"
    dtype: Literal["uint8", "float32", "float16"] = "uint8"
    scale: float = Field(1.0, gt=0)  # float inputs: pixel * scale, then (x - mean) / std
    mean: Annotated[list[float], Field(min_length=3, max_length=3)] | None = None
    std: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=3, max_length=3)] \
        | None = None
    # stretch: resize to height x width; crop: centre-crop to the aspect, then resize;
    # none: the camera must deliver exactly height x width
    resize: Literal["stretch", "crop", "none"] = "stretch"

    @model_validator(mode="after")
    def _normalisation_needs_floats(self) -> CameraInput:
        if self.dtype == "uint8" and (self.mean or self.std or self.scale != 1.0):
            raise ValueError(f"{self.name}: mean/std/scale need a float dtype (uint8 feeds "
                             "raw pixels: the graph normalises)")
        return self

    def shape(self) -> list[int]:
        h, w = self.height, self.width
        return [1, h, w, 3] if self.layout == "HWC" else [1, 3, h, w]


class ProprioInput(_Strict):
    role: Literal["proprio"]
    name: Name
    field: Literal["q", "dq", "effort", "q_cmd"] = "q"
    joints: Joints | None = None  # default: the action joints
    history: int = Field(1, ge=1, le=64)  # > 1: [1, history, D], oldest first
    spacing_s: float = Field(0.0, ge=0, le=10)
    mean: Stats | None = None  # per joint: (x - mean) / std
    std: list[Annotated[float, Field(gt=0)]] | None = None

    @model_validator(mode="after")
    def _history_needs_spacing(self) -> ProprioInput:
        if self.history > 1 and self.spacing_s <= 0:
            raise ValueError(f"{self.name}: history {self.history} needs spacing_s > 0")
        return self


class InstructionInput(_Strict):
    role: Literal["instruction"]
    name: Name
    tokenizer: BundleFile
    kind: Literal["duet-words", "hf-tokenizers"] = "duet-words"
    max_len: int = Field(gt=0, le=4096)
    padding_side: Literal["right", "left"] = "right"
    pad_id: int = Field(0, ge=0)
    mask: Name | None = None  # an int64 [1, max_len] attention-mask input (1 = token)


class PrefixInput(_Strict):
    role: Literal["prefix"]
    name: Name
    steps: int = Field(gt=0, le=256)  # [1, steps, D_action], zero beyond the valid length
    length: Name | None = None  # an int64 [1] input: how many prefix steps are valid


class NoiseInput(_Strict):
    role: Literal["noise"]
    name: Name  # the flow state x_t, [1, H, D_action]


class FlowTimeInput(_Strict):
    role: Literal["flow_time"]
    name: Name  # t, float32 [batch] (rank 1) or [batch, 1] (rank 2), as the graph takes it
    rank: Literal[1, 2] = 1


class StageInput(_Strict):
    role: Literal["stage"]
    name: Name
    source: str = Field(pattern=r"^[^.]+\.[^.]+$")  # "<stage>.<output>"


class CarryInput(_Strict):
    role: Literal["carry"]
    name: Name
    output: Name  # this stage's output whose value this input takes at the next step
    source: str | None = Field(None, pattern=r"^[^.]+\.[^.]+$")  # the first step's value
    fill: float = 0.0  # the first step's value without a source (a start token, an empty KV)


class PositionInput(_Strict):
    role: Literal["position"]
    name: Name  # int64 [batch]: start + the step (where this step writes in the KV buffer)
    start: int = Field(0, ge=0, le=1 << 20)


PlannerInput = Annotated[
    CameraInput | ProprioInput | InstructionInput | PrefixInput | NoiseInput | FlowTimeInput
    | StageInput | CarryInput | PositionInput, Field(discriminator="role")]


class BinsDetokenizer(_Strict):
    """Uniform bins per dimension (RT-2, OpenVLA): the tokens are the chunk time-major (step
    k, joint j at k * D + j); token t is bin t - token_offset of [low, high] (bin centres)."""

    kind: Literal["bins"]
    bins: int = Field(ge=2, le=1 << 16)
    low: Stats  # per action joint, in the model's action space (before de-normalising)
    high: Stats
    token_offset: int = Field(0, ge=0)


class FastDetokenizer(_Strict):
    """FAST (Pertsch et al. 2025): per-dimension DCT of the chunk, coefficients scaled and
    rounded, flattened lowest frequency first, then BPE over those integer symbols. Decoding
    inverts it; coefficients the tokens do not reach are zero (the smooth part is first)."""

    kind: Literal["fast"]
    tokenizer: BundleFile  # the BPE (Hugging Face tokenizers JSON; symbol s is chr(BASE + s))
    scale: float = Field(gt=0, le=1e6)  # coefficients were multiplied by this and rounded
    min_symbol: int = Field(ge=-(1 << 20), le=1 << 20)  # the coefficient symbol 0 stands for
    token_offset: int = Field(0, ge=0)  # the model's token id = the BPE's + token_offset


Detokenizer = Annotated[BinsDetokenizer | FastDetokenizer, Field(discriminator="kind")]


class Loop(_Strict):
    """An autoregressive head: the stage runs once per token, up to `max_steps`, its `carry`
    inputs taking its outputs of the step before (a KV buffer of fixed size, the last token),
    until every row gave `end_token`; the detokenizer turns the tokens into the chunk."""

    max_steps: int = Field(ge=1, le=4096)
    end_token: int | None = Field(None, ge=0)
    detokenizer: Detokenizer


class Output(_Strict):
    name: Name
    role: Literal["actions", "velocity", "features", "token"]
    # features: declared; actions/velocity: [1, H, D_action] from `actions`; token: int64 [1, 1]
    shape: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=1, max_length=6)] \
        | None = None
    dtype: Literal["float32", "float16", "int64"] = "float32"


class Flow(_Strict):
    """A flow-matching head: x starts as standard normal noise at `t_start` and is integrated
    with `steps` Euler steps of the stage's velocity output to `t_end`."""

    steps: int = Field(10, ge=1, le=256)
    t_start: float = 0.0
    t_end: float = 1.0


class Stage(_Strict):
    name: Name
    file: BundleFile
    precision: Precision = "fp32"
    inputs: list[PlannerInput] = Field(min_length=1)
    outputs: list[Output] = Field(min_length=1)
    flow: Flow | None = None
    loop: Loop | None = None

    def output(self, name: str) -> Output | None:
        return next((o for o in self.outputs if o.name == name), None)

    @model_validator(mode="after")
    def _roles_fit(self) -> Stage:
        roles = [i.role for i in self.inputs]
        outs = [o.role for o in self.outputs]
        names = [i.name for i in self.inputs] + [i.mask for i in self.inputs
                                                 if isinstance(i, InstructionInput) and i.mask]
        names += [i.length for i in self.inputs if isinstance(i, PrefixInput) and i.length]
        if len(set(names)) != len(names):
            raise ValueError(f"stage {self.name}: an input name is used twice")
        if self.flow is not None:
            if roles.count("noise") != 1 or roles.count("flow_time") != 1 \
                    or outs.count("velocity") != 1:
                raise ValueError(f"stage {self.name}: a flow stage takes one noise and one "
                                 "flow_time input and gives one velocity output")
        elif "noise" in roles or "flow_time" in roles or "velocity" in outs:
            raise ValueError(f"stage {self.name}: noise/flow_time/velocity need `flow:`")
        if outs.count("actions") > 1:
            raise ValueError(f"stage {self.name}: at most one actions output")
        self._loop_fits(roles, outs)
        for o in self.outputs:
            if o.role == "features" and o.shape is None:
                raise ValueError(f"stage {self.name}: features output {o.name} needs a shape")
        return self


    def _loop_fits(self, roles: Sequence[str], outs: Sequence[str]) -> None:
        if self.loop is None:
            if "carry" in roles or "position" in roles or "token" in outs:
                raise ValueError(f"stage {self.name}: carry/position/token need `loop:`")
            return
        if self.flow is not None or outs.count("token") != 1 or "actions" in outs:
            raise ValueError(f"stage {self.name}: a loop stage gives one token output (and no "
                             "actions: its detokenizer makes the chunk), and has no `flow:`")
        for i in self.inputs:
            if isinstance(i, CarryInput):
                out = self.output(i.output)
                if out is None:
                    raise ValueError(f"stage {self.name}: carry input {i.name} takes output "
                                     f"{i.output}, which this stage does not give")
                if out.role not in ("token", "features"):
                    raise ValueError(f"stage {self.name}: carry input {i.name}: output "
                                     f"{i.output} is {out.role}, not token or features")


class Actions(_Strict):
    horizon: int = Field(ge=2, le=256)
    dt_s: float = Field(ge=1e-3, le=1.0)
    kind: Literal["absolute", "delta"] = "absolute"  # delta: from the observed q
    joints: Joints
    mean: Stats | None = None  # per joint, if not baked: a = x * std + mean
    std: list[Annotated[float, Field(gt=0)]] | None = None

    @model_validator(mode="after")
    def _stats_per_joint(self) -> Actions:
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None and len(v) != len(self.joints):
                raise ValueError(f"actions.{key} has {len(v)} entries for "
                                 f"{len(self.joints)} joints")
        return self


class DeclaredLatency(_Strict):
    """What the bundle's maker measured (observation -> chunk), so a robot whose timing cannot
    carry the planner is refused before it starts (runtime/model/timing.py)."""

    p50_ms: float = Field(gt=0, le=600_000)
    p99_ms: float = Field(gt=0, le=600_000)
    measured_on: str = Field("", max_length=200)  # the device and engine, e.g. "Orin NX, TRT"

    @model_validator(mode="after")
    def _ordered(self) -> DeclaredLatency:
        if self.p99_ms < self.p50_ms:
            raise ValueError(f"latency p99 {self.p99_ms} < p50 {self.p50_ms}")
        return self


class Planner(_Strict):
    stages: list[Stage] = Field(min_length=1, max_length=8)
    actions: Actions
    latency: DeclaredLatency | None = None
    # Observations per engine call: every planner tensor leads with it. A planner server
    # (runtime/remote/server.py) fills up to this many rows from different robots in one
    # call; a robot's own planner fills one. `dynamic_batch`: the graphs take any number of
    # rows up to `batch` (ONNX Runtime computes only those); else always `batch`.
    batch: int = Field(1, ge=1, le=256)
    dynamic_batch: bool = False

    @model_validator(mode="after")
    def _stages_connect(self) -> Planner:
        seen: dict[str, Output] = {}
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"stage names must be unique: {', '.join(twice)} used twice")
        for stage in self.stages:
            for i in stage.inputs:
                if isinstance(i, StageInput) and i.source not in seen:
                    raise ValueError(f"stage {stage.name}: input {i.name} reads {i.source}, "
                                     "which no earlier stage outputs")
                if isinstance(i, CarryInput) and i.source is not None:
                    self._check_carry_source(stage, i, seen)
                if isinstance(i, ProprioInput):
                    _check_stats(i.name, i.mean, i.std, i.joints or self.actions.joints)
            for o in stage.outputs:
                if o.shape is not None and o.shape[0] != self.batch:
                    raise ValueError(f"stage {stage.name}: output {o.name} shape {o.shape} "
                                     f"does not lead with the batch ({self.batch})")
                seen[f"{stage.name}.{o.name}"] = o
        last = self.stages[-1]
        if last.flow is None and last.loop is None and \
                not any(o.role == "actions" for o in last.outputs):
            raise ValueError(f"the last stage ({last.name}) gives no actions: it needs an "
                             "`actions` output, `flow:` (its integrated state is the chunk) or "
                             "`loop:` (its detokenized tokens are)")
        for stage in self.stages:
            if stage.loop is not None:
                self._check_loop(stage, stage is last)
        return self

    def _check_carry_source(self, stage: Stage, i: CarryInput, seen: dict[str, Output]
                            ) -> None:
        src, out = seen.get(i.source or ""), stage.output(i.output)
        if src is None:
            raise ValueError(f"stage {stage.name}: carry input {i.name} starts from "
                             f"{i.source}, which no earlier stage outputs")
        if out is not None and (src.shape, src.dtype) != (out.shape, out.dtype):
            raise ValueError(f"stage {stage.name}: carry input {i.name} starts from "
                             f"{i.source} ({src.dtype}{src.shape}) but takes {i.output} "
                             f"({out.dtype}{out.shape}) after")

    def _check_loop(self, stage: Stage, last: bool) -> None:
        assert stage.loop is not None
        if not last:
            raise ValueError(f"stage {stage.name}: a loop stage is the last (its detokenizer "
                             "gives the chunk)")
        if self.dynamic_batch:
            raise ValueError(f"stage {stage.name}: a loop stage runs with a static batch "
                             "(dynamic_batch: false)")
        d = stage.loop.detokenizer
        if isinstance(d, BinsDetokenizer):
            _check_stats(f"{stage.name}.detokenizer", d.low, d.high, self.actions.joints)
            if any(h <= lo for lo, h in zip(d.low, d.high, strict=True)):
                raise ValueError(f"stage {stage.name}: detokenizer high must exceed low")

    def source(self, ref: str) -> Output:
        stage, out = ref.split(".")
        return next(o for s in self.stages if s.name == stage for o in s.outputs
                    if o.name == out)


def _check_stats(name: str, mean: list[float] | None, std: list[float] | None,
                 joints: list[str]) -> None:
    keys = ("mean", "std") if "detokenizer" not in name else ("low", "high")
    for key, v in zip(keys, (mean, std), strict=True):
        if v is not None and len(v) != len(joints):
            raise ValueError(f"{name}.{key} has {len(v)} entries for {len(joints)} joints")


# ------------------------------------------------------------------------ follower
class ReferenceInput(_Strict):
    role: Literal["reference"]
    name: Name
    steps: int = Field(gt=0, le=64)  # the plan at t + (i+1) * dt_s, i < steps
    dt_s: float = Field(gt=0, le=1.0)


class FollowerProprio(_Strict):
    role: Literal["proprio"]
    name: Name
    field: Literal["q", "dq"] = "q"


class ResidualOutput(_Strict):
    role: Literal["residual"] = "residual"
    name: Name  # [1, D] rad, added to the command (clipped to follower.residual_max)


class Follower(_Strict):
    file: BundleFile
    precision: Precision = "fp32"
    joints: Joints | None = None  # default: the action joints
    inputs: list[Annotated[ReferenceInput | FollowerProprio, Field(discriminator="role")]]
    output: ResidualOutput

    @model_validator(mode="after")
    def _one_reference(self) -> Follower:
        if sum(isinstance(i, ReferenceInput) for i in self.inputs) != 1:
            raise ValueError("the follower takes exactly one reference input")
        return self

    @property
    def reference(self) -> ReferenceInput:
        return next(i for i in self.inputs if isinstance(i, ReferenceInput))


# ------------------------------------------------------------------------ the contract
class Rates(_Strict):
    planner_hz: float = Field(gt=0, le=1000)
    follower_hz: float = Field(gt=0, le=10_000)


class Contract(_Strict):
    rates: Rates
    planner: Planner
    follower: Follower | None = None  # None: the reference alone, no residual

    @property
    def action_joints(self) -> list[str]:
        return list(self.planner.actions.joints)

    @property
    def follower_joints(self) -> list[str]:
        if self.follower is None:
            return []
        return list(self.follower.joints or self.action_joints)

    def proprio_joints(self, i: ProprioInput) -> list[str]:
        return list(i.joints or self.action_joints)

    def joints(self) -> list[str]:
        """Every robot joint the contract names (all must exist on the robot)."""
        names = set(self.action_joints) | set(self.follower_joints)
        for stage in self.planner.stages:
            for i in stage.inputs:
                if isinstance(i, ProprioInput):
                    names |= set(self.proprio_joints(i))
        return sorted(names)

    def cameras(self) -> list[CameraInput]:
        return [i for s in self.planner.stages for i in s.inputs if isinstance(i, CameraInput)]

    def camera_names(self) -> list[str]:
        """The robot cameras the planner reads, each once, sorted."""
        return sorted({c.camera for c in self.cameras()})

    def output_roles(self, model: str) -> dict[str, str]:
        """A model's output name -> role (actions, velocity, features; the follower's:
        residual)."""
        if model == "follower" and self.follower is not None:
            return {self.follower.output.name: "residual"}
        stage = next(s for s in self.planner.stages if s.name == model)
        return {o.name: o.role for o in stage.outputs}

    def model_files(self) -> list[str]:
        """The ONNX graphs: every stage's, and the follower's."""
        return [s.file for s in self.planner.stages] + (
            [self.follower.file] if self.follower is not None else [])

    def files(self) -> list[str]:
        out = [s.file for s in self.planner.stages]
        out += [i.tokenizer for s in self.planner.stages for i in s.inputs
                if isinstance(i, InstructionInput)]
        out += [s.loop.detokenizer.tokenizer for s in self.planner.stages
                if s.loop is not None and isinstance(s.loop.detokenizer, FastDetokenizer)]
        if self.follower is not None:
            out.append(self.follower.file)
        return out

    # ---------------------------------------------------------------- tensors
    def stage_tensors(self, stage: Stage) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The (inputs, outputs) an engine for this stage must have, derived from roles."""
        a = self.planner.actions
        b = self.planner.batch
        chunk = [b, a.horizon, len(a.joints)]
        ins: list[TensorSpec] = []
        for i in stage.inputs:
            if isinstance(i, CameraInput):
                ins.append(TensorSpec(name=i.name, dtype=i.dtype, shape=[b, *i.shape()[1:]]))
            elif isinstance(i, ProprioInput):
                d = len(self.proprio_joints(i))
                shape = [b, d] if i.history == 1 else [b, i.history, d]
                ins.append(TensorSpec(name=i.name, dtype="float32", shape=shape))
            elif isinstance(i, InstructionInput):
                ins.append(TensorSpec(name=i.name, dtype="int64", shape=[b, i.max_len]))
                if i.mask:
                    ins.append(TensorSpec(name=i.mask, dtype="int64", shape=[b, i.max_len]))
            elif isinstance(i, PrefixInput):
                ins.append(TensorSpec(name=i.name, dtype="float32",
                                      shape=[b, i.steps, len(a.joints)]))
                if i.length:
                    ins.append(TensorSpec(name=i.length, dtype="int64", shape=[b]))
            elif isinstance(i, NoiseInput):
                ins.append(TensorSpec(name=i.name, dtype="float32", shape=chunk))
            elif isinstance(i, FlowTimeInput):
                ins.append(TensorSpec(name=i.name, dtype="float32",
                                      shape=[b] if i.rank == 1 else [b, 1]))
            elif isinstance(i, PositionInput):
                ins.append(TensorSpec(name=i.name, dtype="int64", shape=[b]))
            elif isinstance(i, CarryInput):
                out = stage.output(i.output)
                assert out is not None  # Stage._loop_fits
                ins.append(self._output_spec(out, chunk).model_copy(update={"name": i.name}))
            else:
                src = self.planner.source(i.source)
                ins.append(TensorSpec(name=i.name, dtype=src.dtype,
                                      shape=src.shape or chunk))
        return ins, [self._output_spec(o, chunk) for o in stage.outputs]

    def _output_spec(self, o: Output, chunk: list[int]) -> TensorSpec:
        if o.role == "token":  # one token id per row and step
            return TensorSpec(name=o.name, dtype="int64", shape=[self.planner.batch, 1])
        return TensorSpec(name=o.name, dtype=o.dtype, shape=o.shape or chunk)

    def follower_tensors(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        assert self.follower is not None
        d = len(self.follower_joints)
        ins = [TensorSpec(name=i.name, dtype="float32",
                          shape=[1, i.steps, d] if isinstance(i, ReferenceInput) else [1, d])
               for i in self.follower.inputs]
        return ins, [TensorSpec(name=self.follower.output.name, dtype="float32", shape=[1, d])]
