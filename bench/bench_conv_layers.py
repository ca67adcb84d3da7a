"""One quantized 3x3 conv alone: GMAC/s of each integer kernel (width and dispatch path this CPU runs) on
the bundled network's conv shapes, batch 32, 8-bit codes, best of N calls. Against the per-core peaks
of bench/simd_peak.c it says how close each core loop is to its instruction's throughput.

    taskset -c 1 .venv/bin/python bench/bench_conv_layers.py [--repeats 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import clib, integer  # noqa: E402
from model_store.artifact import pack_planes  # noqa: E402

SHAPES = ((28, 32, 32, 1), (14, 64, 64, 1), (7, 128, 128, 1), (28, 32, 64, 2), (14, 64, 128, 2))  # H, cin, cout, s


def kernels() -> list[tuple[int, str]]:
    """(width, path) of every SIMD integer kernel this CPU runs that serves 8 bits."""
    paths = [p for p in clib.available_paths() if p != "scalar"]
    return [(width, path) for width in (16, 8) for path in paths if integer.max_bits(width, path) >= 8]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for h, cin, cout, stride in SHAPES:
        codes8 = rng.integers(0, 256, size=(cout, 9 * cin), dtype=np.uint8)
        acts = rng.integers(0, 256, size=(32, h, h, cin), dtype=np.uint8)
        ho = (h - 1) // stride + 1
        macs = 32 * ho * ho * cout * 9 * cin
        row: dict[str, object] = {"shape": f"{h}x{h} {cin}->{cout} stride {stride}"}
        for width, path in kernels():
            packed = integer.pack_levels(pack_planes(codes8), 8, 9 * cin, width)
            best = float("inf")
            for _ in range(args.repeats + 1):  # the first call warms the caches
                t = time.perf_counter()
                integer.conv_levels(acts, packed, 8, stride, path)
                best = min(best, time.perf_counter() - t)
            row[f"int{width}-{path}"] = round(macs / best / 1e9, 1)
        rows.append(row)
    if args.json:
        print(json.dumps({"gmacs": rows}, indent=1))
    else:
        names = [f"int{w}-{p}" for w, p in kernels()]
        print("| layer, batch 32 | " + " | ".join(f"{n} GMAC/s" for n in names) + " |")
        print("| --- |" + " ---: |" * len(names))
        for row in rows:
            print(f"| {row['shape']} | " + " | ".join(str(row[n]) for n in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
