"""One loaded model version: its plan, compiled forward, batcher, limits and metadata."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rnnserve.server.batching import Batcher, BatchObserver, BatchPolicy, batch_threads
from rnnserve.server.compute_process import ChildSpec, ComputeProcess
from rnnserve.server.errors import InvalidInput, quoted
from rnnserve.server.forward import Forward
from rnnserve.server.inputs import InputSpec
from rnnserve.server.model_config import ConfigError, ModelConfig
from rnnserve.server.plan import Mode, OutputSpec, Plan, build_plan
from rnnserve.server.runner import ModelRunner
from rnnserve.server.selfcheck import mismatch, rows_interact
from rnnserve.server.settings import Settings

log = logging.getLogger(__name__)

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


class LoadState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class ServedModel:
    name: str
    version: int
    path: Path
    config: ModelConfig
    plan: Plan
    runner: ModelRunner
    batcher: Batcher
    max_length: int
    state: LoadState = LoadState.READY
    load_seconds: float = 0.0
    # Sessions pinned to this version; it unloads only when they are gone.
    sessions: set[str] = field(default_factory=set)
    inputs: InputSpec = field(init=False)
    # Output selections already worked out, by request options (see `outputs.select`).
    selections: dict[tuple[object, ...], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.inputs = InputSpec(
            model=self.name,
            step_shape=self.plan.step_shape,
            max_length=self.max_length,
            tokens=self.plan.input_dtype == "int32",
            vocab_size=self.plan.vocab_size,
        )

    @property
    def outputs(self) -> tuple[OutputSpec, ...]:
        return self.plan.outputs

    async def close(self) -> None:
        """Finish queued work, stop the batch workers and background compiles."""
        await self.batcher.close()
        self.runner.forward.close()

    def output_index(self, name: str) -> int:
        for i, spec in enumerate(self.plan.outputs):
            if spec.name == name:
                return i
        names = ", ".join(o.name for o in self.plan.outputs)
        raise InvalidInput(
            f"model {self.name} has no output {quoted(name)}; its outputs are {names}"
        )


def find_model_file(version_dir: Path) -> Path:
    files = sorted(p for p in version_dir.iterdir() if p.suffix in MODEL_SUFFIXES and p.is_file())
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise ConfigError(
            f"{version_dir}: expected exactly one model file ({'/'.join(MODEL_SUFFIXES)}), "
            f"found {found}"
        )
    return files[0]


def _with_labels(plan: Plan, config: ModelConfig) -> Plan:
    known = {o.name for o in plan.outputs}
    unknown = set(config.labels) - known
    if unknown:
        raise ConfigError(
            f"config names outputs {sorted(unknown)}; the model's outputs are {sorted(known)}"
        )
    outputs = []
    for spec in plan.outputs:
        labels = config.labels.get(spec.name, ())
        if labels and spec.shape != (len(labels),):
            raise ConfigError(
                f"output {spec.name} has shape {list(spec.shape)}, "
                f"config gives {len(labels)} labels"
            )
        outputs.append(dataclasses.replace(spec, labels=labels))
    plan.outputs = tuple(outputs)
    return plan


def _policy(settings: Settings, config: ModelConfig, plan: Plan) -> BatchPolicy:
    knobs: dict[str, Any] = {
        "max_batch_size": settings.max_batch_size,
        "max_batch_timesteps": settings.max_batch_timesteps,
        "max_delay_ms": settings.max_delay_ms,
        "gather_ms": settings.gather_ms,
        "max_queue": settings.max_queue,
        "workers": settings.workers,
        **config.batching,
    }
    return BatchPolicy(
        max_batch_size=int(knobs["max_batch_size"]),
        max_batch_timesteps=int(knobs["max_batch_timesteps"]),
        max_delay=float(knobs["max_delay_ms"]) / 1000.0,
        gather=float(knobs["gather_ms"]) / 1000.0,
        max_queue=int(knobs["max_queue"]),
        workers=int(knobs["workers"]),
        equal_lengths_only=not plan.mixed_lengths,
    )


# Warm-up compiles every bucket of up to this many steps before the model takes traffic, and
# one-row buckets up to LATER steps in the background right after.
WARM_NOW, WARM_LATER = 64, 4096


def compile_typical_shapes(forward: Forward, rows: int, max_length: int) -> None:
    """Compile XLA, two buckets at a time, for every batch size bucket of short sequences (what
    lone requests and bursts of them meet) before traffic comes; one-row buckets of long ones
    later, when the server is idle."""
    now = {
        forward.bucket(r, t)
        for r in range(1, rows + 1)
        for t in range(1, min(max_length, WARM_NOW) + 1)
    }
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda key: forward.compile(*key), sorted(now)))
    later = {forward.bucket(1, t) for t in range(1, min(max_length, WARM_LATER) + 1)} - now
    for key in sorted(later):
        forward.compile_later(*key, speculative=True)


def warm_up_sequences(model: ServedModel) -> list[np.ndarray]:
    plan = model.plan
    dtype = np.dtype(plan.input_dtype)
    return [np.zeros((n, *plan.step_shape), dtype) for n in {1, min(model.max_length, 16)}]


def measure_costs(runner: ModelRunner, policy: BatchPolicy, max_length: int) -> BatchPolicy:
    """Time a batch of one row and a full batch of the same length: the policy's cost per padded
    step and per row-step (see `batching`)."""
    plan = runner.forward.plan
    dtype = np.dtype(plan.input_dtype)
    length = min(max_length, 32)
    rows = max(2, policy.max_batch_size)
    batch = [np.zeros((length, *plan.step_shape), dtype) for _ in range(rows)]

    def seconds(sequences: list[np.ndarray]) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            results = runner.run(sequences, [None] * len(sequences))
            times.append(time.perf_counter() - started)
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                raise failed[0]
        return sorted(times)[1]

    one, full = seconds(batch[:1]), seconds(batch)
    row_cost = max((full - one) / (length * (rows - 1)), 1e-9)
    step_cost = max(one / length - row_cost, 0.0)
    return dataclasses.replace(policy, step_cost=step_cost, row_cost=row_cost)


def load_version(
    name: str,
    version: int,
    version_dir: Path,
    config: ModelConfig,
    settings: Settings,
    observer: BatchObserver | None = None,
) -> ServedModel:
    """Load, plan, compile and warm up one version. Blocking: call it off the event loop."""
    import keras  # heavy: imported where models load, not where the client runs

    started = time.perf_counter()
    path = find_model_file(version_dir)
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):  # Keras: "File not found"
        raise InvalidInput(f"{path.name} is not a .keras archive (a zip file): cut short or other")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=not settings.allow_code)
    except ValueError as exc:
        if "safe_mode" not in str(exc):
            raise
        raise InvalidInput(
            f"{path.name} carries code (for example a Lambda layer) and was refused; start the "
            "server with --allow-code only if you trust where the model came from"
        ) from exc
    plan = _with_labels(build_plan(model, allow_code=settings.allow_code), config)
    limits = [settings.max_length, config.max_length, plan.fixed_length]
    max_length = min(v for v in limits if v is not None)
    policy = _policy(settings, config, plan)

    def runner_for(plan: Plan) -> ModelRunner:
        return ModelRunner(Forward(plan, xla=settings.xla, max_rows=policy.max_batch_size))

    why = ""
    checked: ModelRunner | None = None
    try:
        checked = runner_for(plan)
        excess = mismatch(model, checked, max_length)
        if excess > 0:
            why = f"self-check under padding was off by {excess:.2e}"
    except Exception as exc:  # a Keras behaviour the planner did not foresee
        if plan.mode is Mode.EQUAL_LENGTH:
            raise
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        why = f"the padded engine failed its self-check ({type(exc).__name__}: {detail})"
    if checked is not None and not why:
        runner = checked
    else:
        if checked is not None:
            checked.forward.close()  # its background compiles are of no use now
        log.warning("model %s version %d: %s; batching equal lengths only", name, version, why)
        forced = build_plan(model, allow_code=settings.allow_code, equal_length_because=why)
        plan = _with_labels(forced, config)
        policy = _policy(settings, config, plan)
        runner = runner_for(plan)
    if plan.mode is Mode.EQUAL_LENGTH and policy.max_batch_size > 1:
        excess = rows_interact(runner, min(max_length, 16))
        if excess > 0:
            note = f"rows of one batch change each other's answers (by {excess:.2e}): one per batch"
            log.warning("model %s version %d: %s", name, version, note)
            plan = dataclasses.replace(plan, notes=(*plan.notes, note))
            policy = dataclasses.replace(policy, max_batch_size=1)
    compute = None
    if settings.compute_process and plan.mode is not Mode.EQUAL_LENGTH:
        spec = ChildSpec(
            str(path),
            settings.allow_code,
            settings.xla,
            policy.max_batch_size,
            max_length if settings.warmup else 0,
        )
        threads = batch_threads(policy, f"{name}:{version}")
        try:
            compute = ComputeProcess(spec, threads, name=f"{name}:{version}")
        except RuntimeError as exc:  # the model serves all the same, in this process
            log.error("model %s version %d: %s; computing in process", name, version, exc)
            threads.shutdown(wait=False)
        else:
            note = "batches computed in a child process"
            plan = dataclasses.replace(plan, notes=(*plan.notes, note))
    if compute is None and settings.warmup:
        compile_typical_shapes(runner.forward, policy.max_batch_size, max_length)
    policy = measure_costs(runner, policy, max_length)
    batcher = Batcher(runner, policy, name=f"{name}:{version}", observer=observer, executor=compute)
    served = ServedModel(
        name=name,
        version=version,
        path=path,
        config=config,
        plan=plan,
        runner=runner,
        batcher=batcher,
        max_length=max_length,
        load_seconds=time.perf_counter() - started,
    )
    log.info(
        "loaded %s version %d from %s in %.2fs: mode=%s step/row cost=%.2g/%.2gs outputs=%s%s",
        name,
        version,
        path,
        served.load_seconds,
        plan.mode.value,
        policy.step_cost,
        policy.row_cost,
        [o.name for o in plan.outputs],
        "".join(f"; {note}" for note in plan.notes),
    )
    return served
