"""Runs one micro-batch of work items through a model's compiled forward, in a worker thread.

A batch that raises is split in halves and each half retried, so a poisoned sequence fails alone
and its neighbours still get their answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rnnserve.server.errors import InferenceFailed
from rnnserve.server.forward import Forward, pad_batch
from rnnserve.server.logs import Throttle
from rnnserve.server.plan import Mode

log = logging.getLogger(__name__)
_TRACEBACKS = Throttle(interval=10.0)


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
    padded_timesteps: int  # rows x longest: the batch as formed
    computed_timesteps: int  # what the model ran: padded further to a compiled shape
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
        self,
        sequences: Sequence[np.ndarray],
        states: Sequence[Sequence[np.ndarray] | None],
        cells: list[int] | None = None,
    ) -> list[RowResult | Exception]:
        """Results in the order given; an exception in place of a row that could not run. The
        rows x timesteps of every shape the model ran (padding to compiled shapes included) are
        appended to `cells`."""
        try:
            return list(self._run(sequences, states, cells))
        except Exception as exc:
            if len(sequences) == 1:
                # TensorFlow's message names graph nodes, source files and lines: it goes to the
                # log (a traceback at most every 10 s per kind), the client gets only its kind.
                allowed, held = _TRACEBACKS.allow((type(exc).__name__,), time.monotonic())
                if allowed:
                    log.warning(
                        "inference failed for one sequence of %d steps%s",
                        len(sequences[0]),
                        f" (and {held} more like it since the last traceback)" if held else "",
                        exc_info=exc,
                    )
                return [
                    InferenceFailed(
                        f"inference failed for this sequence ({type(exc).__name__}); "
                        "the server log has the details"
                    )
                ]
        half = len(sequences) // 2
        return self.run(sequences[:half], states[:half], cells) + self.run(
            sequences[half:], states[half:], cells
        )

    def padded_length(self, lengths: Sequence[int]) -> int:
        return max(max(lengths), self._pad_to or 0)

    def _run(
        self,
        sequences: Sequence[np.ndarray],
        states: Sequence[Sequence[np.ndarray] | None],
        cells: list[int] | None,
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
        if cells is not None:
            cells.append(rows * steps)
        results = []
        for row, length in enumerate(lengths[:count].tolist()):
            heads = [
                head[row, :length] if stepped else head[row]
                for head, stepped in zip(out.heads, out.stepped, strict=True)
            ]
            finals = [s[row] for s in out.states] if sessions else []
            results.append(RowResult(heads, out.stepped, finals))
        return results
