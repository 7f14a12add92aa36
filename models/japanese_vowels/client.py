"""Classify the japanese_vowels test split through a running server; print accuracy and throughput.

rnnserve serve &                      # or ./scripts/serve.sh
python models/japanese_vowels/client.py [--target 127.0.0.1:8500]
"""

from __future__ import annotations

import argparse

from recipe import load_test_split  # the recipe next to this file (the script's directory)

from rnnserve.training.through_server import classify_split

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:8500")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    xs, labels = load_test_split()
    classify_split(args.target, "japanese_vowels", xs, labels, concurrency=args.concurrency)
