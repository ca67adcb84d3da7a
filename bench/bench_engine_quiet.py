"""Engine latency at the machine's quiet speed: back-to-back batch calls per bits for a few seconds each,
printing the minimum and the 10th percentile beside the median. On a shared VM whose speed swings by tens
of percent for seconds at a time (bench/bench_speed_noise.py), the median of a short run measures the
neighbours as much as the code; the low end is where the code's own cost shows, and it repeats to ~2 %.

To compare two versions of the kernels, build the other one in a worktree and alternate the two, pinned,
from this checkout:

    here=$PWD; git worktree add /tmp/old REV && (cd /tmp/old && $here/.venv/bin/python setup.py build_ext --inplace)
    for i in 1 2 3 4; do for d in /tmp/old $here; do
        (cd $d && PYTHONPATH=$d taskset -c 1 $here/.venv/bin/python bench/bench_engine_quiet.py); done; done

(PYTHONPATH: the project is installed in .venv in editable mode, so without it both runs import this
checkout.) Options: --bits 1,8 --batch 32 --seconds 3 --threads 1 --json.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from kernels.engine import Engine
from model_store import artifact, fashion_mnist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="1,8")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    engine = Engine(artifact.load(), threads=args.threads)
    images = fashion_mnist.load("test").images[: args.batch].reshape(args.batch, 1, 28, 28)
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        engine.run(images, bits)  # warm: build the bits' state
        times: list[float] = []
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            t = time.perf_counter()
            engine.run(images, bits)
            times.append(time.perf_counter() - t)
        ms = 1e3 * np.asarray(times)
        rows.append(
            {
                "bits": bits,
                "backend": engine.backend(bits),
                "calls": len(ms),
                "ms_min": round(float(ms.min()), 3),
                "ms_p10": round(float(np.percentile(ms, 10)), 3),
                "ms_median": round(float(np.median(ms)), 3),
            }
        )
    if args.json:
        print(json.dumps({"batch": args.batch, "threads": args.threads, "rows": rows}, indent=2))
        return
    for r in rows:
        print(
            f"{r['bits']:>2} bits {r['backend']:<14} batch {args.batch}: min {r['ms_min']:.2f} ms, "
            f"p10 {r['ms_p10']:.2f}, median {r['ms_median']:.2f} ({r['calls']} calls)"
        )
    if len(rows) == 2:
        print(f"ratio {rows[0]['bits']}/{rows[1]['bits']} bits: min {rows[0]['ms_min'] / rows[1]['ms_min']:.3f}")


if __name__ == "__main__":
    main()
