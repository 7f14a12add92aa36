"""Choose which outputs a response carries and encode them: sequence-level rows, per-step rows
trimmed to each sequence's length, top-k labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rnnserve.server.errors import InvalidInput, quoted
from rnnserve.server.runner import RowResult
from rnnserve.server.served_model import ServedModel
from rnnserve.v1 import inference_pb2 as pb

_MODES = {
    pb.OUTPUT_MODE_DEFAULT,
    pb.OUTPUT_MODE_SEQUENCE,
    pb.OUTPUT_MODE_STEPS,
    pb.OUTPUT_MODE_BOTH,
}
_F32 = np.dtype("<f4")
_CACHED_SELECTIONS = 256  # per model version; requests vary only in mode, names and top_k


@dataclass(frozen=True, slots=True)
class HeadChoice:
    index: int
    name: str
    labels: tuple[str, ...]
    sequence: bool  # send the sequence-level row
    steps: bool  # send the per-step rows


@dataclass(frozen=True)
class Selection:
    heads: tuple[HeadChoice, ...]
    top_k: int


def select(model: ServedModel, mode: int, names: Sequence[str], top_k: int) -> Selection:
    """The outputs to send for these request options (worked out once per distinct options)."""
    if len(names) > len(model.outputs):  # before the cache key: it would hold every name sent
        raise InvalidInput(
            f"{len(names)} output names for model {model.name}, which has "
            f"{len(model.outputs)} outputs; name each at most once"
        )
    key = (mode, top_k, *names)
    selection = model.selections.get(key)
    if selection is None:
        selection = _select(model, mode, names, top_k)
        if len(model.selections) < _CACHED_SELECTIONS:
            model.selections[key] = selection
    return selection


def _select(model: ServedModel, mode: int, names: Sequence[str], top_k: int) -> Selection:
    if mode not in _MODES:
        raise InvalidInput(f"unknown output_mode {mode}; expected DEFAULT, SEQUENCE, STEPS or BOTH")
    if top_k < 0:
        raise InvalidInput(f"top_k must be >= 0, got {top_k}")
    if len(set(names)) < len(names):
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        raise InvalidInput(f"output {quoted(twice)} is named twice; name each output at most once")
    indices = [model.output_index(n) for n in names] if names else range(len(model.outputs))
    heads = []
    for h in indices:
        spec = model.outputs[h]
        want_steps = mode in (pb.OUTPUT_MODE_STEPS, pb.OUTPUT_MODE_BOTH) or (
            mode == pb.OUTPUT_MODE_DEFAULT and spec.per_step
        )
        if want_steps and not model.runner.forward.stepped[h]:
            raise InvalidInput(
                f"output {spec.name} of model {model.name} is one per sequence and the model is "
                "not causal, so it has no per-step values; use OUTPUT_MODE_SEQUENCE"
            )
        want_sequence = mode != pb.OUTPUT_MODE_STEPS and not (
            mode == pb.OUTPUT_MODE_DEFAULT and spec.per_step
        )
        heads.append(HeadChoice(h, spec.name, spec.labels, want_sequence, want_steps))
    return Selection(tuple(heads), top_k)


def _fill(tensor: pb.Tensor, array: np.ndarray) -> None:
    """Write an output array (float32, C order, as the runner makes them) into a Tensor."""
    if type(array) is not np.ndarray or array.dtype != _F32 or not array.flags.c_contiguous:
        array = np.array(array, dtype=_F32, order="C")  # (a 0-d output stays 0-d)
    tensor.dtype = pb.DATA_TYPE_FLOAT32
    tensor.shape.extend(array.shape)
    tensor.data = array.tobytes()


def _top_k(out: pb.OutputValue, row: np.ndarray, k: int, labels: Sequence[str]) -> None:
    for i in np.argsort(-row, kind="stable")[:k].tolist():
        out.top_k.add(index=i, label=labels[i] if labels else "", score=float(row[i]))


def encode_row(row: RowResult, length: int, sel: Selection, result: pb.SequenceResult) -> None:
    """Fill `result` (a message already in its response) with one sequence's outputs."""
    result.length = length
    for head in sel.heads:
        value = row.heads[head.index]
        out = result.outputs.add(name=head.name)
        if head.sequence:
            last = value[-1] if row.stepped[head.index] else value
            _fill(out.sequence, last)
            if sel.top_k and last.ndim == 1:
                _top_k(out, last, sel.top_k, head.labels)
        if head.steps:
            _fill(out.steps, value)
            if head.labels and value.ndim == 2:
                out.step_classes.extend(value.argmax(axis=1).tolist())
