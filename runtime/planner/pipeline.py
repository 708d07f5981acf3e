"""A bundle's planner as one callable: observation in, absolute joint waypoints for the whole
robot out. Everything model-specific comes from the contract; there is no branch for any
particular model here.

Per call: feed every input by its role (cameras, proprio history, instruction, action
prefix), run the stages in order -- a stage with `flow:` K times, integrating its velocity
field from Gaussian noise with Euler steps --, then turn the chunk into robot waypoints
(de-normalise, delta -> absolute, the bundle's joints onto the robot's by name; joints the
bundle does not drive hold what the follower commands). Buffers are allocated once; each
stage's time and each engine call's time are kept for telemetry and the summary.

A bundle exported with `planner.batch: N` takes N observations per engine call
(`plan_batch`, the planner server's path for several robots); `plan` fills one row.

Used by the planner process, the planner server, the closed-loop eval and the bench alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.config import DuetConfig
from runtime.ipc.stats import Ring, summarize
from runtime.model.bundle import Bundle
from runtime.model.contract import (
    CameraInput,
    CarryInput,
    Contract,
    FlowTimeInput,
    InstructionInput,
    Loop,
    NoiseInput,
    PositionInput,
    PrefixInput,
    ProprioInput,
    StageInput,
)
from runtime.model.detokenizer import ChunkCodec, DetokenizeError, make_codec
from runtime.model.engines import Engine, EngineKind, ProviderArg, engine_options, make_engine
from runtime.model.plan import Plan
from runtime.model.tokenizer import InstructionEncoder, TokenizerError
from runtime.planner.observation import CameraFeed, ObservationError, StateHistory


class PipelineError(ValueError):
    """The bundle's planner cannot run on this robot; the message names the input."""


@dataclass
class _LoopRun:
    """A loop stage's state: its tokens per row, what feeds each step, the codec."""

    spec: Loop
    codec: ChunkCodec
    tokens: np.ndarray  # [batch, max_steps] int64
    lengths: np.ndarray  # [batch]: tokens before the end token (or max_steps)
    token: str = ""  # the token output
    carries: list[CarryInput] = field(default_factory=list)
    position: PositionInput | None = None
    step_ms: Ring = field(default_factory=lambda: Ring(1 << 16))
    steps: Ring = field(default_factory=lambda: Ring(4096))  # steps per plan


@dataclass
class _StageRun:
    name: str
    engine: Engine
    feeds: dict[str, np.ndarray]
    from_stage: list[tuple[str, str]]  # (feed name, "stage.output")
    flow_noise: str | None = None
    flow_time: str | None = None
    velocity: str | None = None
    actions: str | None = None
    loop: _LoopRun | None = None
    ms: Ring = field(default_factory=lambda: Ring(4096))


@dataclass
class Observation:
    """One observation: frames by camera, the state history, and what the follower holds."""

    frames: dict[str, np.ndarray]
    history: StateHistory
    t_obs_ns: int  # the read time of the state the plan is computed from
    instruction: str | None = None  # None: the one last set (`set_instruction`)


@dataclass
class PlanRequest:
    """An observation and what the robot executes meanwhile (the action prefix's source)."""

    obs: Observation
    previous: Plan | None = None  # the plan executing now, on the robot's clock (s)
    prefix_valid_s: float = 0.0  # how long after t_obs this plan is expected to take effect


def sample_times_ns(spec: ProprioInput, t_obs_ns: int) -> list[int]:
    """The state read times a proprio input samples, oldest first."""
    return [t_obs_ns - round((spec.history - 1 - k) * spec.spacing_s * 1e9)
            for k in range(spec.history)]


def state_times_ns(contract: Contract, t_obs_ns: int) -> list[int]:
    """Every state read time a plan from t_obs reads (what a relay sends the server)."""
    times = {t_obs_ns}
    for stage in contract.planner.stages:
        for i in stage.inputs:
            if isinstance(i, ProprioInput):
                times.update(sample_times_ns(i, t_obs_ns))
    return sorted(times)


def instruction_encoder(i: InstructionInput, bundle: Bundle) -> InstructionEncoder:
    """The tokenizer of an instruction input (TokenizerError naming what is wrong)."""
    return InstructionEncoder(i.kind, bundle.path / i.tokenizer, i.max_len, i.padding_side,
                              i.pad_id)


class PlannerPipeline:
    @classmethod
    def configured(cls, bundle: Bundle, cfg: DuetConfig) -> PlannerPipeline:
        """The pipeline as a robot's config sets it up (engine, providers, K, threads)."""
        return cls(bundle, list(cfg.robot.joints), cfg.bundle.engine,
                   **engine_options(cfg.bundle, "planner"), flow_steps=cfg.planner.flow_steps,
                   threads=cfg.planner.threads, prefix=cfg.planner.prefix)

    def __init__(self, bundle: Bundle, robot_joints: list[str], engine: EngineKind = "onnxruntime",
                 *, flow_steps: int | None = None, threads: int = 1, prefix: bool = True,
                 seed: int | None = None, engines: dict[str, Engine] | None = None,
                 providers: Sequence[ProviderArg] | None = None,
                 cache_dir: str | Path | None = None) -> None:
        """`engines`: prebuilt engines by stage name (tests, benches); else made here, on
        `providers` (ONNX Runtime) with TensorRT plans from `cache_dir`."""
        c = bundle.contract
        self.contract, self.bundle = c, bundle
        self.robot_joints = list(robot_joints)
        index = {j: k for k, j in enumerate(robot_joints)}
        try:
            self._act_idx = np.array([index[j] for j in c.action_joints], dtype=np.intp)
        except KeyError as exc:
            raise PipelineError(f"actions.joints: {exc.args[0]!r} is not a robot joint "
                                f"({', '.join(robot_joints)})") from None
        a = c.planner.actions
        self.horizon, self.dt_s, self.delta = a.horizon, a.dt_s, a.kind == "delta"
        d_act = len(a.joints)
        self._std = np.asarray(a.std if a.std is not None else [1.0] * d_act)
        self._mean = np.asarray(a.mean if a.mean is not None else [0.0] * d_act)
        self.use_prefix = prefix
        self.batch = c.planner.batch
        self.dynamic = c.planner.dynamic_batch  # an engine call computes only the rows filled
        self._rng = np.random.default_rng(seed)
        self.cameras: list[CameraFeed] = []
        self.proprio: list[tuple[ProprioInput, np.ndarray, np.ndarray]] = []
        self.instruction: list[tuple[InstructionEncoder, np.ndarray, np.ndarray | None]] = []
        self.prefixes: list[tuple[PrefixInput, np.ndarray, np.ndarray | None]] = []
        self.stages: list[_StageRun] = []
        self.flow_steps: dict[str, int] = {}
        self._outputs: dict[str, np.ndarray] = {}
        self._flow_step: dict[str, np.ndarray] = {}
        self._instruction: list[str | None] = [None] * self.batch  # encoded per row
        self._row_feeds: list[np.ndarray] = []  # feeds filled row by row from observations
        for stage in c.planner.stages:
            spec = bundle.stage_spec(stage)
            eng = engines[stage.name] if engines else make_engine(
                spec, bundle, engine, threads=threads, providers=providers, cache_dir=cache_dir,
                dynamic_batch=self.batch if self.dynamic else None)
            feeds = eng.inputs  # filled in place: each call (K for a flow head) copies nothing
            run = _StageRun(stage.name, eng, feeds, [])
            if stage.loop is not None:
                try:
                    codec = make_codec(stage.loop.detokenizer, bundle.path, a.horizon)
                except Exception as exc:  # the tokenizers library's own error types
                    raise PipelineError(f"stage {stage.name}: detokenizer: {exc}") from None
                run.loop = _LoopRun(stage.loop, codec,
                                    np.zeros((self.batch, stage.loop.max_steps), np.int64),
                                    np.zeros(self.batch, np.intp))
            for i in stage.inputs:
                self._bind_input(i, feeds, run, bundle, index)
            for o in stage.outputs:
                if o.role == "velocity":
                    run.velocity = o.name
                elif o.role == "actions":
                    run.actions = o.name
                elif o.role == "token" and run.loop is not None:
                    run.loop.token = o.name
            if run.loop is not None:
                eng.carry([(c.output, c.name) for c in run.loop.carries])
            if stage.flow is not None:
                k = flow_steps if flow_steps is not None else stage.flow.steps
                if k < 1:
                    raise PipelineError(f"planner.flow_steps must be >= 1, got {k}")
                self.flow_steps[stage.name] = k
            self.stages.append(run)
        last = c.planner.stages[-1]
        self._flow_last = last.flow is not None
        self._loop_chunks = np.zeros((self.batch, self.horizon, d_act))
        self.prefix_steps = max((p.steps for p, _, _ in self.prefixes), default=0)
        self.plan_ms = Ring(4096)
        self.engine_ms = Ring(4096)  # the engines' own share of plan_ms
        self._chunk = np.zeros((self.horizon, d_act))
        self._waypoints = np.zeros((self.batch, self.horizon, len(robot_joints)),
                                   dtype=np.float32)

    # ------------------------------------------------------------------ inputs
    def _bind_input(self, i: object, feeds: dict[str, np.ndarray], run: _StageRun,
                    bundle: Bundle, index: dict[str, int]) -> None:
        if isinstance(i, CameraInput):
            self.cameras.append(CameraFeed(i, feeds[i.name]))
            self._row_feeds.append(feeds[i.name])
        elif isinstance(i, ProprioInput):
            joints = self.contract.proprio_joints(i)
            missing = [j for j in joints if j not in index]
            if missing:
                raise PipelineError(f"input {i.name}: joints {missing} are not on the robot")
            self.proprio.append((i, np.array([index[j] for j in joints]), feeds[i.name]))
            self._row_feeds.append(feeds[i.name])
        elif isinstance(i, InstructionInput):
            try:
                enc = instruction_encoder(i, bundle)
            except TokenizerError as exc:
                raise PipelineError(f"input {i.name}: {exc}") from None
            self.instruction.append((enc, feeds[i.name], feeds[i.mask] if i.mask else None))
            self._row_feeds += [feeds[i.name]] + ([feeds[i.mask]] if i.mask else [])
        elif isinstance(i, PrefixInput):
            self.prefixes.append((i, feeds[i.name], feeds[i.length] if i.length else None))
            self._row_feeds += [feeds[i.name]] + ([feeds[i.length]] if i.length else [])
        elif isinstance(i, NoiseInput):
            run.flow_noise = i.name
        elif isinstance(i, FlowTimeInput):
            run.flow_time = i.name
        elif isinstance(i, StageInput):
            run.from_stage.append((i.name, i.source))
        elif isinstance(i, CarryInput) and run.loop is not None:
            run.loop.carries.append(i)
        elif isinstance(i, PositionInput) and run.loop is not None:
            run.loop.position = i

    def camera_names(self) -> list[str]:
        return sorted({f.spec.camera for f in self.cameras})

    def check_instruction(self, text: str) -> None:
        """TokenizerError naming what the model cannot read."""
        for enc, _, _ in self.instruction:
            enc.check(text)

    def set_instruction(self, text: str, row: int = 0) -> None:
        if text != self._instruction[row]:
            for enc, ids, mask in self.instruction:
                enc.encode(text, ids[row], None if mask is None else mask[row])
            self._instruction[row] = text

    # ------------------------------------------------------------------ one plan
    def plan(self, obs: Observation, previous: Plan | None = None,
             prefix_valid_s: float = 0.0) -> np.ndarray:
        """Waypoints [H, n_robot] float32 (a buffer reused by the next call) from `obs`.

        `previous`: the plan executing now, in absolute robot joints on the same clock (s =
        ns / 1e9); its part from t_obs to t_obs + `prefix_valid_s` (what will run while this
        plan is computed) is the action prefix for models that take one.
        """
        out = self.plan_batch([PlanRequest(obs, previous, prefix_valid_s)])[0]
        if isinstance(out, ObservationError):
            raise out
        return out

    def plan_batch(self, requests: list[PlanRequest]) -> list[np.ndarray | ObservationError]:
        """One engine call (per stage, per flow step) for up to `batch` observations: each
        one's waypoints [H, n_robot] (views on a buffer the next call reuses), or the
        ObservationError that kept it out of the call."""
        if not 1 <= len(requests) <= self.batch:
            raise ValueError(f"{len(requests)} observations for a batch of {self.batch}")
        t0 = time.perf_counter_ns()
        rows: list[int] = []  # the request each filled row holds
        results: list[np.ndarray | ObservationError] = []
        q_obs: list[tuple[np.ndarray, np.ndarray]] = []
        for k, req in enumerate(requests):
            row = len(rows)
            try:
                q_obs.append(self._fill_row(req, row))
            except ObservationError as exc:
                results.append(exc)
                continue
            rows.append(k)
            results.append(self._waypoints[row])
        if not rows:
            return results
        n = len(rows) if self.dynamic else None  # the rows an engine call computes
        if n is None:
            for feed in self._row_feeds:  # spare rows repeat a real one: finite, and ignored
                feed[len(rows):] = feed[:1]
        engine_ns = 0
        for run in self.stages:
            ts = time.perf_counter_ns()
            for name, src in run.from_stage:
                np.copyto(run.feeds[name], self._outputs[src], casting="same_kind")
            steps = self.flow_steps.get(run.name)
            if run.loop is not None:
                engine_ns += self._decode(run, run.loop, len(rows))
            elif steps is None:
                te = time.perf_counter_ns()
                out = run.engine.run(run.feeds, n)
                engine_ns += time.perf_counter_ns() - te
                for name, value in out.items():
                    self._outputs[f"{run.name}.{name}"] = value
            else:
                engine_ns += self._integrate(run, steps, n)
            run.ms.add((time.perf_counter_ns() - ts) / 1e6)
        last = self.stages[-1]
        if last.loop is not None:
            chunks = self._loop_chunks
            for row, k in enumerate(rows):
                try:
                    last.loop.codec.decode(last.loop.tokens[row, :last.loop.lengths[row]],
                                           chunks[row])
                except DetokenizeError as exc:
                    results[k] = ObservationError(f"stage {last.name}: {exc}")
        else:
            chunks = last.feeds[last.flow_noise] if self._flow_last and last.flow_noise \
                else self._outputs[f"{last.name}.{last.actions}"]
        for row, (q, q_hold) in enumerate(q_obs):
            self._chunk[:] = chunks[row]
            self._to_robot(q, q_hold, row)
        self.engine_ms.add(engine_ns / 1e6)
        self.plan_ms.add((time.perf_counter_ns() - t0) / 1e6)
        return results

    def _fill_row(self, req: PlanRequest, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Feed one observation into `row`; (q at t_obs, q_cmd at t_obs)."""
        obs, t_obs = req.obs, req.obs.t_obs_ns
        q_obs = obs.history.at("q", t_obs)
        for cam in self.cameras:
            frame = obs.frames.get(cam.spec.camera)
            if frame is None:
                raise ObservationError(f"no frame from camera {cam.spec.camera}")
            cam.fill(frame, row)
        for spec, idx, feed in self.proprio:
            for k, t_k in enumerate(sample_times_ns(spec, t_obs)):  # oldest first
                _normalised(feed[row] if spec.history == 1 else feed[row, k],
                            obs.history.at(spec.field, t_k)[idx], spec)
        if obs.instruction is not None:
            self.set_instruction(obs.instruction, row)
        elif row:
            raise ObservationError("an observation in a batch needs its instruction")
        if self.prefixes:
            self._fill_prefix(req.previous, t_obs, req.prefix_valid_s, q_obs, row)
        return q_obs.copy(), obs.history.at("q_cmd", t_obs).copy()

    def _integrate(self, run: _StageRun, steps: int, rows: int | None) -> int:
        """Euler integration of the stage's velocity field from standard normal noise."""
        stage = next(s for s in self.contract.planner.stages if s.name == run.name)
        assert stage.flow is not None and run.flow_noise and run.flow_time and run.velocity
        x, t = run.feeds[run.flow_noise], run.feeds[run.flow_time]
        self._rng.standard_normal(dtype=np.float32, out=x)
        h = (stage.flow.t_end - stage.flow.t_start) / steps
        step = self._flow_step.get(run.name)
        if step is None or step.shape != x.shape:
            step = self._flow_step[run.name] = np.zeros_like(x)
        engine_ns = 0
        for k in range(steps):
            t.fill(stage.flow.t_start + k * h)
            te = time.perf_counter_ns()
            v = run.engine.run(run.feeds, rows)[run.velocity]
            engine_ns += time.perf_counter_ns() - te
            np.multiply(v, h, out=step)
            x += step
        return engine_ns

    def _decode(self, run: _StageRun, loop: _LoopRun, rows: int) -> int:
        """Autoregressive decoding: one engine step per token, the carried inputs (a KV
        buffer, the last token) fed from the step before inside the engine, until every
        filled row gave the end token or max_steps; each step's time is kept."""
        feeds, spec = run.feeds, loop.spec
        for c in loop.carries:  # the first step's values
            if c.source is not None:
                np.copyto(feeds[c.name], self._outputs[c.source], casting="same_kind")
            else:
                feeds[c.name].fill(c.fill)
        ended = np.zeros(self.batch, dtype=bool)
        ended[rows:] = True  # spare rows of a static batch do not hold the loop up
        loop.lengths[:] = spec.max_steps
        carried = any(c.output == loop.token for c in loop.carries)
        engine_ns, k = 0, 0
        for k in range(spec.max_steps):
            if loop.position is not None:
                feeds[loop.position.name].fill(loop.position.start + k)
            te = time.perf_counter_ns()
            out = run.engine.step(k == 0)
            token = run.engine.carried(loop.token) if carried else out[loop.token]
            step_ns = time.perf_counter_ns() - te
            engine_ns += step_ns
            loop.step_ms.add(step_ns / 1e6)
            loop.tokens[:, k] = token[:, 0]
            if spec.end_token is not None:
                done = ~ended & (token[:, 0] == spec.end_token)
                loop.lengths[done] = k
                ended |= done
                if ended.all():
                    break
        loop.steps.add(k + 1)
        return engine_ns

    def _fill_prefix(self, previous: Plan | None, t_obs_ns: int, valid_s: float,
                     q_obs: np.ndarray, row: int) -> None:
        d = 0
        if self.use_prefix and previous is not None:
            t_obs = t_obs_ns / 1e9
            # the steps of the new chunk that run before it can take effect
            d = min(self.prefix_steps, math.floor(valid_s / self.dt_s + 1e-9))
            if t_obs + d * self.dt_s > previous.t_end:  # the old plan does not cover them
                d = max(0, int((previous.t_end - t_obs) / self.dt_s))
        if d:
            times = t_obs_ns / 1e9 + (np.arange(d) + 1.0) * self.dt_s
            pos, vel = np.zeros((d, len(self.robot_joints))), np.zeros((d, len(self.robot_joints)))
            previous.sample(times, pos, vel)  # type: ignore[union-attr]
            a = pos[:, self._act_idx]
            if self.delta:
                a = a - q_obs[self._act_idx]
            a = (a - self._mean) / self._std
        for spec, out, length in self.prefixes:
            out[row] = 0.0
            n = min(d, spec.steps)
            if n:
                out[row, :n] = a[:n]
            if length is not None:
                length[row] = n

    def _to_robot(self, q_obs: np.ndarray, q_hold: np.ndarray, row: int) -> None:
        a = self._chunk
        a *= self._std
        a += self._mean
        if self.delta:
            a += q_obs[self._act_idx]
        w = self._waypoints[row]
        w[:] = q_hold  # joints the bundle does not drive hold what the follower commands
        w[:, self._act_idx] = a

    def interrupt(self) -> None:
        """Stop a plan in progress (any thread): its engine call raises EngineInterrupted,
        and so does every later one (the process is stopping)."""
        for run in self.stages:
            run.engine.interrupt()

    # ------------------------------------------------------------------ figures
    def stage_ms(self, last: int | None = None) -> dict[str, dict[str, float]]:
        """Per stage (and the whole call, and the engines' share) p50/p99 in ms."""
        keys = ("p50", "p99")
        out = {run.name: summarize(run.ms.values(last), keys, digits=3) for run in self.stages}
        for run in self.stages:  # a loop stage's per-step time and steps per plan
            if run.loop is not None:
                out[f"{run.name}.step"] = summarize(run.loop.step_ms.values(last), keys, digits=3)
                out[f"{run.name}.steps"] = summarize(run.loop.steps.values(last), keys, digits=1)
        out["total"] = summarize(self.plan_ms.values(last), keys, digits=3)
        out["engines"] = summarize(self.engine_ms.values(last), keys, digits=3)
        return out


def _normalised(out: np.ndarray, x: np.ndarray, spec: ProprioInput) -> None:
    out[:] = x
    if spec.mean is not None:
        out -= np.asarray(spec.mean, dtype=out.dtype)
    if spec.std is not None:
        out /= np.asarray(spec.std, dtype=out.dtype)
