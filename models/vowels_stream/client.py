"""Stream one long test series of vowels_stream through a session, chunk by chunk, printing the
speaker whenever the model's per-frame tag changes; then the per-frame accuracy and the rate.

    rnnserve serve &                      # or ./scripts/serve.sh
    python models/vowels_stream/client.py [--target 127.0.0.1:8500] [--chunk 25]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from recipe import load_test_split  # the recipe next to this file (the script's directory)

from rnnserve.client import Client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:8500")
    parser.add_argument("--chunk", type=int, default=25, help="frames per chunk")
    parser.add_argument("--stream", type=int, default=0, help="which test stream")
    args = parser.parse_args()
    streams, tags = load_test_split()
    series, truth = streams[args.stream], tags[args.stream]
    current, tagged = None, []
    started = time.perf_counter()
    with Client(args.target) as client, client.session("vowels_stream") as session:
        labels = client.metadata("vowels_stream").outputs[0].labels
        for start in range(0, len(series), args.chunk):
            result = session.send(series[start : start + args.chunk])
            for offset, cls in enumerate(result.output.step_classes):
                if cls != current:
                    current = int(cls)
                    print(f"frame {start + offset:5d}: {labels[current]}")
            tagged.extend(result.output.step_classes.tolist())
    seconds = time.perf_counter() - started
    accuracy = float(np.mean(np.asarray(tagged) == truth))
    print(
        f"{len(series)} frames in chunks of {args.chunk}: "
        f"per-frame accuracy {accuracy:.4f}, {len(series) / seconds:.0f} frames/s"
    )


if __name__ == "__main__":
    main()
