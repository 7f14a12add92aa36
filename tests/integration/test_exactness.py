"""The invariant: whatever the server does (padding, masking, batching with strangers), each
sequence's answer equals `model(x)` on that sequence alone, unpadded, within 1e-5."""

from __future__ import annotations

import asyncio
import copy
import zlib
from typing import Any

import numpy as np
import pytest

from rnnserve.client import AsyncClient, Prediction

import zoo

# Distinct lengths from 1 to 300 (the reference traces once per length).
LENGTHS = [1, 2, 3, 5, 8, 13, 25, 50, 100, 128, 150, 210, 256, 300]
SEQUENCES = 210
ATOL = 1e-5


async def _send_all(target: str, model: str, xs: list[np.ndarray], output: str) -> list[Prediction]:
    """One request per sequence, all in flight at once, plus a few multi-sequence requests."""
    async with AsyncClient(target, timeout=300) as client:
        singles = [client.predict(model, [x], output=output) for x in xs[:-30]]
        starts = range(len(xs) - 30, len(xs), 10)
        groups = [client.predict(model, xs[i : i + 10], output=output) for i in starts]
        done = await asyncio.gather(*singles, *groups)
    return [p for batch in done for p in batch]


def _close(got: np.ndarray | None, want: np.ndarray, what: str) -> None:
    assert got is not None, f"{what}: missing"
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=what)


@pytest.mark.parametrize("arch", zoo.ARCHITECTURES, ids=lambda a: a.name)
def test_each_sequence_equals_the_model_alone(
    arch: zoo.Arch, zoo_server: Any, zoo_repository: tuple[Any, dict[str, Any]]
) -> None:
    model = zoo_repository[1][arch.name]
    rng = np.random.default_rng(zlib.crc32(arch.name.encode()))
    lengths = [1, 300, *rng.choice(LENGTHS, size=SEQUENCES - 2).tolist()]
    xs = zoo.sequences(arch, lengths, rng)
    output = "both" if arch.causal else "default"

    # The server is shared by the session: count this test's batches only.
    before = copy.copy(zoo_server.batcher_stats(arch.name))
    predictions = asyncio.run(_send_all(zoo_server.target, arch.name, xs, output))
    after = zoo_server.batcher_stats(arch.name)

    rows = after.rows - before.rows
    batches = after.batches - before.batches
    real = after.real_timesteps - before.real_timesteps
    padded = after.padded_timesteps - before.padded_timesteps
    assert rows == SEQUENCES, f"{rows} rows computed for {SEQUENCES} sequences"
    assert real == sum(lengths)
    assert batches < rows, f"requests never shared a batch ({rows} rows in {batches} batches)"
    if arch.mixed:
        assert padded > real, "no mixed-length batch formed"
    else:
        assert padded == real, "equal-length model got padding"
    assert len(predictions) == SEQUENCES
    reference = zoo.Reference(model)
    for i, (x, p) in enumerate(zip(xs, predictions, strict=True)):
        assert p.length == len(x)
        wants = reference(x)
        assert len(p.outputs) == len(wants)
        for out, want in zip(p.outputs.values(), wants, strict=True):
            where = f"sequence {i} (length {len(x)}), output {out.name}"
            per_step = want.ndim == out.sequence.ndim + 1 if out.sequence is not None else True
            if per_step:
                assert out.steps is not None, where
                _close(out.steps, want, where)
                if out.sequence is not None:
                    _close(out.sequence, want[-1], where + " (last step)")
            else:
                _close(out.sequence, want, where)
                if arch.causal:
                    # Per-step rows of a many-to-one head are the answers for each prefix.
                    assert out.steps is not None, where
                    assert out.steps.shape[0] == len(x), where
                    _close(out.steps[-1], want, where + " (last prefix)")
                    head = list(p.outputs).index(out.name)
                    for n in (n for n in (1, 25, 100) if n < len(x)):
                        _close(out.steps[n - 1], reference(x[:n])[head], where + f" prefix {n}")
