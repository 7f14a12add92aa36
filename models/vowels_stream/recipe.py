"""Train the ``vowels_stream`` model: per-frame speaker tags over a long stream of speech.

Data: streams made by concatenating randomly chosen JapaneseVowels utterances (aeon wheel).
Training streams draw from the official TRAIN split (fresh streams every epoch), test streams
from the TEST split (a fixed, seeded set), so no test utterance is ever seen in training. Every
frame is tagged with the speaker of the utterance it belongs to; nothing marks the boundaries.

Model: a causal many-to-many stack, Masking -> Normalization -> GRU -> GRU ->
TimeDistributed(Dense softmax) ``speaker``. No Bidirectional and no go_backwards: the tag of a
frame depends only on frames up to it, so the server can stream it chunk by chunk.

    python models/vowels_stream/recipe.py [--epochs N] [--out models/vowels_stream/1]

Importable: ``load_test_split()`` gives the test streams and their per-frame labels.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
from keras import layers

from rnnserve.training.spec import (
    FloatArray,
    IntArray,
    LayerSpec,
    build_model,
    masked_moments,
    pad_sequences,
    padded_dataset,
    predict_sequences,
    save_for_serving,
    set_seed,
    without_time_distributed,
    write_json,
)
from rnnserve.training.ts_format import load_classification

NAME = "vowels_stream"
HERE = Path(__file__).resolve().parent
SEED = 20240608
TEST_SEED = 7  # fixed apart from --seed: the test streams never change
EPOCHS = 24
FEATURES = 12
LABELS = [f"speaker {i}" for i in range(1, 10)]
TRAIN_UTTERANCES = (8, 96)  # utterances per training stream: ~120..1500 frames
TEST_UTTERANCES = (20, 200)  # per test stream: ~300..3200 frames
TEST_STREAMS = 24


def load_utterances(split: str) -> tuple[list[FloatArray], IntArray]:
    series, labels, classes = load_classification("JapaneseVowels", split)
    if classes != tuple(str(i) for i in range(1, 10)):
        raise ValueError(f"unexpected JapaneseVowels classes {classes}")
    return series, labels


def make_stream(
    series: list[FloatArray], labels: IntArray, picks: np.ndarray
) -> tuple[FloatArray, IntArray]:
    """Concatenate the picked utterances; tag each frame with its utterance's speaker."""
    frames = np.concatenate([series[i] for i in picks])
    tags = np.concatenate([np.full(len(series[i]), labels[i], dtype=np.int64) for i in picks])
    return frames, tags


def load_test_split() -> tuple[list[FloatArray], list[IntArray]]:
    """The test streams (T_i, 12) and their per-frame speaker indices (T_i,), both seeded.

    Utterances are drawn from a pool of concatenated permutations of the TEST split, so every
    test utterance appears about equally often, each time in a different context.
    """
    series, labels = load_utterances("test")
    rng = np.random.default_rng(TEST_SEED)
    counts = rng.integers(TEST_UTTERANCES[0], TEST_UTTERANCES[1] + 1, size=TEST_STREAMS)
    passes = -(-int(counts.sum()) // len(series))
    pool = np.concatenate([rng.permutation(len(series)) for _ in range(passes)])
    bounds = np.concatenate([[0], np.cumsum(counts)])
    streams = [make_stream(series, labels, pool[a:b]) for a, b in itertools.pairwise(bounds)]
    return [s[0] for s in streams], [s[1] for s in streams]


class RandomStreams:
    """Fresh training streams every epoch (each ``iter()`` draws new ones). All rows of a
    batch hold the same number of utterances, so their lengths are close and the zero padding
    (masked, weight 0) stays small."""

    def __init__(
        self, series: list[FloatArray], labels: IntArray, batches: int, batch_size: int, seed: int
    ) -> None:
        self.series, self.labels = series, labels
        self.batches, self.batch_size = batches, batch_size
        self.rng = np.random.default_rng(seed)
        self.lengths_seen = (sys.maxsize, 0)  # shortest and longest stream trained on

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        for _ in range(self.batches):
            count = int(self.rng.integers(TRAIN_UTTERANCES[0], TRAIN_UTTERANCES[1] + 1))
            rows = [
                make_stream(self.series, self.labels, self.rng.integers(0, len(self.series), count))
                for _ in range(self.batch_size)
            ]
            x = pad_sequences([r[0] for r in rows])
            lengths = [len(r[0]) for r in rows]
            self.lengths_seen = (
                min(self.lengths_seen[0], *lengths),
                max(self.lengths_seen[1], *lengths),
            )
            y = pad_sequences([r[1] for r in rows], dtype="int64")
            yield x, y, pad_sequences([np.ones(len(r[1])) for r in rows])


def make_spec(train_x: list[FloatArray]) -> list[LayerSpec]:
    mean, variance = masked_moments(train_x)
    return [
        (layers.Masking, [], {"mask_value": 0.0}),
        (layers.Normalization, [], {"mean": mean, "variance": variance}),
        # Forward-only recurrent layers returning every step: causal, hence streamable.
        (layers.GRU, [64], {"return_sequences": True}),
        (layers.GRU, [64], {"return_sequences": True}),
        (layers.Dense, [len(LABELS)], {"activation": "softmax"},
         (layers.TimeDistributed, [], {"name": "speaker"})),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--out", type=Path, default=HERE / "1")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    set_seed(args.seed)
    train_series, train_labels = load_utterances("train")
    test_x, test_y = load_test_split()
    spec = make_spec(train_series)
    # Train the TimeDistributed-free twin (see without_time_distributed), serve the real spec.
    model = build_model(without_time_distributed(spec), (None, FEATURES), name=NAME)
    streams = RandomStreams(train_series, train_labels, batches=12, batch_size=32, seed=args.seed)
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, args.epochs * len(streams))
    model.compile(
        optimizer=keras.optimizers.Adam(schedule, clipnorm=1.0),
        loss="sparse_categorical_crossentropy",
        weighted_metrics=["accuracy"],  # padded steps carry weight 0
    )
    model.summary()
    started = time.perf_counter()
    dataset = padded_dataset(streams.__iter__, len(streams), FEATURES, per_step=True)
    model.fit(dataset, epochs=args.epochs, verbose=1 if sys.stdout.isatty() else 2)
    train_seconds = time.perf_counter() - started

    serving = build_model(spec, (None, FEATURES), name=NAME)
    serving.set_weights(model.get_weights())
    path = save_for_serving(
        serving,
        args.out,
        {
            "description": "Per-frame speaker (1-9) over a stream of Japanese vowel utterances",
            "max_length": 4096,
            "outputs": {"speaker": {"labels": LABELS}},
            "batching": {"max_batch_size": 64, "max_batch_timesteps": 32768},
        },
    )
    served = keras.saving.load_model(path, compile=False, safe_mode=True)
    predicted = [p.argmax(axis=-1) for p in predict_sequences(served, test_x, batch_size=24)]
    correct = np.concatenate([p == y for p, y in zip(predicted, test_y, strict=True)])
    # How fast it locks on: accuracy by position within an utterance (frame 0, 1, ...).
    offsets = np.concatenate([_offsets(y) for y in test_y])
    by_offset = {int(k): round(float(correct[offsets == k].mean()), 4) for k in range(8)}
    lengths = [len(x) for x in test_x]
    metrics = {
        "model": NAME,
        "test_accuracy": round(float(correct.mean()), 4),
        "test_accuracy_by_frame_in_utterance": by_offset,
        "test_cases": len(test_x),
        "test_frames": int(correct.size),
        "train_streams_per_epoch": len(streams) * streams.batch_size,
        "train_seconds": round(train_seconds, 1),
        "epochs": args.epochs,
        "seed": args.seed,
        "test_seed": TEST_SEED,
        "length_min": min(lengths),
        "length_max": max(lengths),
        "train_lengths": list(streams.lengths_seen),
        "utterances_per_stream": {"train": TRAIN_UTTERANCES, "test": TEST_UTTERANCES},
        "parameters": served.count_params(),
        "model_bytes": path.stat().st_size,
        "keras": keras.__version__,
    }
    write_json(args.out / "metrics.json", metrics)
    print(metrics)
    return 0


def _offsets(tags: IntArray) -> IntArray:
    """Frame index within its utterance. Boundaries are found from tag changes, so two
    consecutive utterances of one speaker count as one (rare: about 1 in 9)."""
    starts = np.flatnonzero(np.diff(tags, prepend=-1))
    run = np.repeat(starts, np.diff(np.append(starts, len(tags))))
    return np.arange(len(tags)) - run


if __name__ == "__main__":
    raise SystemExit(main())
