"""How steady is this machine? One bits' engine run in a tight loop on one core; prints the median
per-image time of every second (wall, and the calling thread's CPU time) and the steal time the kernel
reported for that core in it. CPU time follows wall time here (0.98–0.99 of it, slow seconds included):
the swings are a slower CPU, not time the guest sees taken away, so the server's engine CPU counter
(apserve_engine_cpu_seconds_total) sees them.

On a shared VM the per-image time can swing by tens of percent for seconds at a time with no steal
reported (a busy SMT sibling, frequency, memory bandwidth): what a deterministic simulator cannot see,
and what overloads a server running near its capacity. Run it pinned, with nothing else running:

    taskset -c 0 .venv/bin/python bench/bench_speed_noise.py [--bits 1] [--batch 16] [--seconds 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from kernels import profiler
from kernels.engine import Engine
from model_store import artifact, fashion_mnist


def steal_ticks(cpu: int) -> int:
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith(f"cpu{cpu} "):
                return int(line.split()[8])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(artifact.BUNDLED))
    parser.add_argument("--bits", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = artifact.load(args.model)
    engine = Engine(model, threads=1, backends=profiler.saved_backends(model))
    images = fashion_mnist.load("test").images[: args.batch][:, None]
    cpu = sorted(os.sched_getaffinity(0))[0]
    for _ in range(10):
        engine.run(images, args.bits)
    per_image_ms: dict[int, list[float]] = {}
    cpu_per_image_ms: dict[int, list[float]] = {}
    steal_at: dict[int, int] = {}
    t0 = time.perf_counter()
    while (t := time.perf_counter()) < t0 + args.seconds:
        second = int(t - t0)
        steal_at.setdefault(second, steal_ticks(cpu))
        cpu_t = time.thread_time()
        engine.run(images, args.bits)
        per_image_ms.setdefault(second, []).append((time.perf_counter() - t) * 1000 / args.batch)
        cpu_per_image_ms.setdefault(second, []).append((time.thread_time() - cpu_t) * 1000 / args.batch)
    steal_at[args.seconds] = steal_ticks(cpu)
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    rows = [
        {
            "second": s,
            "ms_per_image": statistics.median(v),
            "cpu_ms_per_image": statistics.median(cpu_per_image_ms[s]),
            "steal_ms": (steal_at[s + 1] - steal_at[s]) * tick_ms if s + 1 in steal_at else None,
        }
        for s, v in sorted(per_image_ms.items())
    ]
    medians = [statistics.median(v) for _, v in sorted(per_image_ms.items())]
    summary = {"bits": args.bits, "batch": args.batch, "cpu": cpu, "min": min(medians), "max": max(medians)}
    summary["median"] = statistics.median(medians)
    for r in rows:
        print(
            f"{r['second']:3d} s  {r['ms_per_image']:.3f} ms/image  thread CPU {r['cpu_ms_per_image']:.3f} ms/image  "
            f"steal {r['steal_ms']} ms",
            file=sys.stderr,
        )
    print(
        f"per-second median ms/image: min {summary['min']:.3f}, median {summary['median']:.3f}, "
        f"max {summary['max']:.3f} ({summary['max'] / summary['min']:.2f} x the fastest second)",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps({**summary, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
