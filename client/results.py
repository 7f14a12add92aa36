"""Typed, numpy-backed views of rnnserve responses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from rnnserve.client.tensors import dtype_name, from_tensor
from rnnserve.v1 import inference_pb2 as pb

# What `output=` takes: each output in its own kind, one row per sequence, per step, or both.
OutputMode = Literal["default", "sequence", "steps", "both"]
OUTPUT_MODES: Mapping[str, int] = {
    "default": pb.OUTPUT_MODE_DEFAULT,
    "sequence": pb.OUTPUT_MODE_SEQUENCE,
    "steps": pb.OUTPUT_MODE_STEPS,
    "both": pb.OUTPUT_MODE_BOTH,
}


def output_mode(name: str) -> int:
    try:
        return OUTPUT_MODES[name]
    except KeyError:
        raise ValueError(f"output must be one of {', '.join(OUTPUT_MODES)}, got {name!r}") from None


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Output:
    """One output of one sequence. Its arrays are read-only views of the response's bytes (no
    copy); `np.array(...)` gives a copy to change."""

    name: str
    sequence: np.ndarray | None  # [n]: for the whole sequence (or everything streamed so far)
    steps: np.ndarray | None  # [T, n]: one row per timestep
    top_k: tuple[ClassScore, ...] = ()
    step_classes: np.ndarray | None = None  # [T] argmax class per step (outputs with labels)

    @property
    def label(self) -> str | None:
        """The best class's label, when top_k was asked for and the output has labels."""
        return (self.top_k[0].label or None) if self.top_k else None  # unlabelled: '' on the wire


@dataclass(frozen=True)
class Prediction:
    length: int
    outputs: dict[str, Output]

    @property
    def output(self) -> Output:
        """The output of a single-output model."""
        if len(self.outputs) != 1:
            raise ValueError(f"the model has outputs {list(self.outputs)}; pick one by name")
        return next(iter(self.outputs.values()))

    def __getitem__(self, name: str) -> Output:
        return self.outputs[name]


@dataclass(frozen=True)
class StepResult(Prediction):
    """A session chunk's answer: steps cover this chunk, `sequence` everything streamed so far."""

    session_id: str = ""
    total_steps: int = 0


@dataclass(frozen=True)
class OutputInfo:
    name: str
    per_step: bool
    shape: tuple[int, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    versions: tuple[int, ...]
    description: str
    input_dtype: str
    step_shape: tuple[int, ...]
    max_length: int
    outputs: tuple[OutputInfo, ...]
    can_stream: bool
    mixed_length_batching: bool
    notes: tuple[str, ...] = field(default=())
    state_sizes: tuple[int, ...] = field(default=())


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model: str
    version: int
    steps: int
    idle_ttl: float


def _output(value: pb.OutputValue) -> Output:
    return Output(
        name=value.name,
        sequence=from_tensor(value.sequence) if value.HasField("sequence") else None,
        steps=from_tensor(value.steps) if value.HasField("steps") else None,
        top_k=tuple(ClassScore(c.index, c.label, c.score) for c in value.top_k),
        step_classes=np.asarray(value.step_classes, dtype=np.int32)
        if len(value.step_classes)
        else None,
    )


def prediction(result: pb.SequenceResult) -> Prediction:
    return Prediction(result.length, {o.name: _output(o) for o in result.outputs})


def step_result(response: pb.StepResponse) -> StepResult:
    result = response.result
    return StepResult(
        length=result.length,
        outputs={o.name: _output(o) for o in result.outputs},
        session_id=response.session_id,
        total_steps=response.steps,
    )


def model_info(meta: pb.ModelMetadata) -> ModelInfo:
    return ModelInfo(
        name=meta.name,
        version=meta.version,
        versions=tuple(meta.available_versions),
        description=meta.description,
        input_dtype=dtype_name(meta.input_dtype),
        step_shape=tuple(meta.step_shape),
        max_length=meta.max_length,
        outputs=tuple(
            OutputInfo(o.name, o.kind == pb.OUTPUT_KIND_STEP, tuple(o.shape), tuple(o.labels))
            for o in meta.outputs
        ),
        can_stream=meta.can_stream,
        mixed_length_batching=meta.mixed_length_batching,
        notes=tuple(meta.notes),
        state_sizes=tuple(size for s in meta.states for size in s.sizes),
    )


def session_info(info: pb.SessionInfo) -> SessionInfo:
    return SessionInfo(
        info.session_id, info.model_name, info.model_version, info.steps, info.idle_ttl_seconds
    )
