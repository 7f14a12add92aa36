"""Runs one micro-batch of work items through a model's compiled forward, in a worker thread.

A batch that raises is split in halves and each half retried, so a poisoned sequence fails alone
and its neighbours still get their answers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rnnserve.server.errors import InferenceFailed
from rnnserve.server.forward import Forward, pad_batch
from rnnserve.server.plan import Mode

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RowResult:
    """One sequence's outputs. `heads[h]` is [length, ...] when `stepped[h]`, else [...]."""

    heads: list[np.ndarray]
    stepped: list[bool]
    states: list[np.ndarray]  # final state, one [size] array per state tensor (sessions only)


@dataclass(slots=True)
class BatchStats:
    rows: int
    real_timesteps: int
    padded_timesteps: int
    seconds: float


class ModelRunner:
    """Pads a list of sequences (with optional initial states), runs them, splits the results."""

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        plan = forward.plan
        self.state_sizes = plan.state_sizes
        # Unproven models with a fixed time length only run at that length.
        self._pad_to = plan.fixed_length if plan.mode is Mode.EQUAL_LENGTH else None

    def run(
        self, sequences: Sequence[np.ndarray], states: Sequence[Sequence[np.ndarray] | None]
    ) -> list[RowResult | Exception]:
        """Results in the order given; an exception in place of a row that could not run."""
        try:
            return list(self._run(sequences, states))
        except Exception as exc:
            if len(sequences) == 1:
                log.warning("inference failed for one sequence: %s", exc)
                return [InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}")]
        half = len(sequences) // 2
        return self.run(sequences[:half], states[:half]) + self.run(sequences[half:], states[half:])

    def padded_length(self, lengths: Sequence[int]) -> int:
        return max(max(lengths), self._pad_to or 0)

    def _run(
        self, sequences: Sequence[np.ndarray], states: Sequence[Sequence[np.ndarray] | None]
    ) -> list[RowResult]:
        plan = self.forward.plan
        count = len(sequences)
        steps = self.padded_length([len(s) for s in sequences])
        rows, steps = self.forward.shape_for(count, steps)
        x, lengths = pad_batch(sequences, plan.step_shape, plan.input_dtype, steps, rows)
        initial = None
        sessions = bool(self.state_sizes) and any(s is not None for s in states)
        if sessions:
            initial = [np.zeros((rows, size), np.float32) for size in self.state_sizes]
            for row, row_states in enumerate(states):
                if row_states is not None:
                    for k, value in enumerate(row_states):
                        initial[k][row] = value
        out = self.forward(x, lengths, initial, final_states=sessions)
        results = []
        for row, length in enumerate(lengths[:count].tolist()):
            heads = [
                head[row, :length] if stepped else head[row]
                for head, stepped in zip(out.heads, out.stepped, strict=True)
            ]
            finals = [s[row] for s in out.states] if sessions else []
            results.append(RowResult(heads, out.stepped, finals))
        return results
