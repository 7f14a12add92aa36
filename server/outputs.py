"""Choose which outputs a response carries and encode them: sequence-level rows, per-step rows
trimmed to each sequence's length, top-k labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rnnserve.client.tensors import to_tensor
from rnnserve.server.errors import InvalidInput
from rnnserve.server.runner import RowResult
from rnnserve.server.served_model import ServedModel
from rnnserve.v1 import inference_pb2 as pb

_MODES = {
    pb.OUTPUT_MODE_DEFAULT,
    pb.OUTPUT_MODE_SEQUENCE,
    pb.OUTPUT_MODE_STEPS,
    pb.OUTPUT_MODE_BOTH,
}


@dataclass(frozen=True)
class Selection:
    """For each chosen output head: its index, and whether to send its sequence / step rows."""

    heads: tuple[int, ...]
    sequence: tuple[bool, ...]
    steps: tuple[bool, ...]
    top_k: int


def select(model: ServedModel, mode: int, names: Sequence[str], top_k: int) -> Selection:
    if mode not in _MODES:
        raise InvalidInput(f"unknown output_mode {mode}; expected DEFAULT, SEQUENCE, STEPS or BOTH")
    if top_k < 0:
        raise InvalidInput(f"top_k must be >= 0, got {top_k}")
    heads = (
        tuple(model.output_index(n) for n in names) if names else tuple(range(len(model.outputs)))
    )
    sequence, steps = [], []
    for h in heads:
        spec = model.outputs[h]
        want_steps = mode in (pb.OUTPUT_MODE_STEPS, pb.OUTPUT_MODE_BOTH) or (
            mode == pb.OUTPUT_MODE_DEFAULT and spec.per_step
        )
        if want_steps and not model.runner.forward.stepped[h]:
            raise InvalidInput(
                f"output {spec.name} of model {model.name} is one per sequence and the model is "
                "not causal, so it has no per-step values; use OUTPUT_MODE_SEQUENCE"
            )
        steps.append(want_steps)
        sequence.append(
            mode != pb.OUTPUT_MODE_STEPS and not (mode == pb.OUTPUT_MODE_DEFAULT and spec.per_step)
        )
    return Selection(heads, tuple(sequence), tuple(steps), top_k)


def _top_k(row: np.ndarray, k: int, labels: Sequence[str]) -> list[pb.ClassScore]:
    order = np.argsort(-row, kind="stable")[:k]
    return [
        pb.ClassScore(index=int(i), label=labels[i] if labels else "", score=float(row[i]))
        for i in order
    ]


def encode_row(
    model: ServedModel, row: RowResult, length: int, sel: Selection
) -> pb.SequenceResult:
    result = pb.SequenceResult(length=length)
    for h, want_seq, want_steps in zip(sel.heads, sel.sequence, sel.steps, strict=True):
        spec = model.outputs[h]
        value = row.heads[h]
        last = value[-1] if row.stepped[h] else value
        out = result.outputs.add(name=spec.name)
        if want_seq:
            out.sequence.CopyFrom(to_tensor(last))
            if sel.top_k and last.ndim == 1:
                out.top_k.extend(_top_k(last, sel.top_k, spec.labels))
        if want_steps:
            out.steps.CopyFrom(to_tensor(value))
            if spec.labels and value.ndim == 2:
                out.step_classes.extend(np.argmax(value, axis=1).tolist())
    return result
