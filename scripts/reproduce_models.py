"""Retrain shipped models with their recipes in a scratch directory; compare each with its card.

A model reproduces when the retrained test accuracy is within --tolerance (0.02) of the committed
`models/<name>/1/metrics.json`. The committed models are never touched. Needs the `train` extra
(`pip install -e '.[train]'`: the data sets come from the aeon and sktime wheels).

    python scripts/reproduce_models.py                      # all three, ~8 minutes on 2 cores
    python scripts/reproduce_models.py japanese_vowels      # ~30 s
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def shipped() -> list[str]:
    return sorted(p.parent.name for p in MODELS.glob("*/recipe.py"))


def retrain(name: str, out: Path) -> tuple[dict[str, float], float]:
    """Run the recipe as a user would; (its metrics.json, wall seconds)."""
    started = time.perf_counter()
    log = out.with_suffix(".log")
    with log.open("w") as sink:
        done = subprocess.run(
            [sys.executable, str(MODELS / name / "recipe.py"), "--out", str(out)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{name}: recipe exited {done.returncode}\n{tail}")
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"default: all of {', '.join(shipped())}")
    parser.add_argument("--tolerance", type=float, default=0.02)
    args = parser.parse_args(argv)
    names = args.models or shipped()
    unknown = set(names) - set(shipped())
    if unknown:
        parser.error(f"no recipe for {sorted(unknown)}; shipped: {shipped()}")
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix="rnnserve-retrain-") as scratch:
        for name in names:
            card = json.loads((MODELS / name / "1" / "metrics.json").read_text())
            print(f"retraining {name} (card: {card['test_accuracy']}) ...", flush=True)
            got, seconds = retrain(name, Path(scratch) / name)
            diff = got["test_accuracy"] - card["test_accuracy"]
            ok = abs(diff) <= args.tolerance
            failed += [] if ok else [name]
            rows.append(
                f"| {name} | {card['test_accuracy']:.4f} | {got['test_accuracy']:.4f} | "
                f"{diff:+.4f} | {'yes' if ok else '**no**'} | {got['train_seconds']:.0f} | "
                f"{seconds:.0f} |"
            )
    print(
        f"\n| model | card | retrained | difference | within {args.tolerance} | "
        "training s | whole recipe s |\n|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
