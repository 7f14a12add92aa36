"""Evaluate a test split through a running rnnserve server: what the example clients run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np

from rnnserve.client import AsyncClient


async def _classify(
    target: str, model: str, xs: Sequence[np.ndarray], per_request: int, concurrency: int
) -> list[int]:
    limit = asyncio.Semaphore(concurrency)
    async with AsyncClient(target, timeout=600) as client:

        async def one(start: int) -> list[int]:
            async with limit:
                got = await client.predict(
                    model, xs[start : start + per_request], output="sequence"
                )
            return [int(np.argmax(p.output.sequence)) for p in got]

        groups = await asyncio.gather(*(one(i) for i in range(0, len(xs), per_request)))
    return [c for group in groups for c in group]


def classify_split(
    target: str,
    model: str,
    xs: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    per_request: int = 1,
    concurrency: int = 32,
) -> tuple[float, float]:
    """Send every sequence, print and return (accuracy, sequences per second)."""
    started = time.perf_counter()
    predicted = asyncio.run(_classify(target, model, xs, per_request, concurrency))
    seconds = time.perf_counter() - started
    accuracy = float(np.mean(np.asarray(predicted) == np.asarray(labels)))
    steps = sum(len(x) for x in xs)
    print(
        f"{model}: {len(xs)} test sequences, accuracy {accuracy:.4f}, "
        f"{len(xs) / seconds:.0f} sequences/s ({steps / seconds:.0f} timesteps/s) "
        f"with {concurrency} requests in flight"
    )
    return accuracy, len(xs) / seconds
