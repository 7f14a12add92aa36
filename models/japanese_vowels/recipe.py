"""Train the ``japanese_vowels`` model: which of 9 speakers uttered a Japanese vowel pair.

Data: JapaneseVowels (UCI; Kudo, Toyama & Shimbo 1999) as shipped in the aeon wheel, with its
official split: 270 TRAIN / 370 TEST utterances of 7..29 frames x 12 LPC cepstrum coefficients.

Model: a causal many-to-one stack, Masking -> Normalization -> GRU -> Dense softmax ``speaker``.
It is forward-only, so the server can also stream it (the per-step output is the speaker guess
for the prefix heard so far).

    python models/japanese_vowels/recipe.py [--epochs N] [--out models/japanese_vowels/1]

Importable: ``load_test_split()`` gives the official TEST split as the server would receive it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import keras
import numpy as np
from keras import layers

from rnnserve.training.spec import (
    FloatArray,
    IntArray,
    PaddedBatches,
    build_model,
    masked_moments,
    predict_sequences,
    save_for_serving,
    set_seed,
    write_json,
)
from rnnserve.training.ts_format import load_classification

NAME = "japanese_vowels"
HERE = Path(__file__).resolve().parent
SEED = 20240607
EPOCHS = 60
FEATURES = 12
LABELS = [f"speaker {i}" for i in range(1, 10)]


def load_split(split: str) -> tuple[list[FloatArray], IntArray]:
    """One official split: (T, 12) float32 arrays and class indices 0..8 (speaker 1..9)."""
    series, labels, classes = load_classification("JapaneseVowels", split)
    if classes != tuple(str(i) for i in range(1, 10)):
        raise ValueError(f"unexpected JapaneseVowels classes {classes}")
    return series, labels


def load_test_split() -> tuple[list[FloatArray], IntArray]:
    return load_split("test")


def make_model(train_x: list[FloatArray]) -> keras.Model:
    mean, variance = masked_moments(train_x)
    spec = [
        # Zero-padded frames are masked; the GRU carries its state over them unchanged.
        (layers.Masking, [], {"mask_value": 0.0}),
        # Standardization lives in the model so clients send raw coefficients.
        (layers.Normalization, [], {"mean": mean, "variance": variance}),
        (layers.GRU, [64], {"dropout": 0.1}),
        (layers.Dropout, [0.3], {}),
        (layers.Dense, [len(LABELS)], {"activation": "softmax", "name": "speaker"}),
    ]
    return build_model(spec, (None, FEATURES), name=NAME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--out", type=Path, default=HERE / "1")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    set_seed(args.seed)
    train_x, train_y = load_split("train")
    test_x, test_y = load_test_split()
    model = make_model(train_x)
    # pool_batches=1: random batches; lengths only span 7..26, so padding costs little here.
    batches = PaddedBatches(train_x, train_y, batch_size=16, pool_batches=1, seed=args.seed)
    # Cosine decay: the last epochs settle instead of bouncing, so the result does not hinge
    # on the exact epoch training stops at.
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, args.epochs * len(batches))
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.summary()
    started = time.perf_counter()
    model.fit(batches.dataset(), epochs=args.epochs, verbose=1 if sys.stdout.isatty() else 2)
    train_seconds = time.perf_counter() - started

    train_lengths = [len(s) for s in train_x]
    test_lengths = [len(s) for s in test_x]
    path = save_for_serving(
        model,
        args.out,
        {
            "description": "Speaker (1-9) of a Japanese vowel utterance from 12 LPC cepstra/frame",
            "max_length": 64,
            "outputs": {"speaker": {"labels": LABELS}},
            "batching": {"max_batch_size": 64, "max_batch_timesteps": 2048},
        },
    )
    # Score the file the server will load, not the in-memory model.
    served = keras.saving.load_model(path, compile=False, safe_mode=True)
    predicted = np.array([p.argmax() for p in predict_sequences(served, test_x)])
    accuracy = float((predicted == test_y).mean())
    metrics = {
        "model": NAME,
        "test_accuracy": round(accuracy, 4),
        "test_cases": len(test_x),
        "train_cases": len(train_x),
        "train_seconds": round(train_seconds, 1),
        "epochs": args.epochs,
        "seed": args.seed,
        "length_min": min(train_lengths + test_lengths),
        "length_max": max(train_lengths + test_lengths),
        "train_lengths": [min(train_lengths), max(train_lengths)],
        "test_lengths": [min(test_lengths), max(test_lengths)],
        "parameters": served.count_params(),
        "model_bytes": path.stat().st_size,
        "keras": keras.__version__,
    }
    write_json(args.out / "metrics.json", metrics)
    print(metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
