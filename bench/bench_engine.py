"""The engine benchmark as a Markdown table with the issue's targets checked, for docs/PERFORMANCE.md.

    taskset -c 0,1 .venv/bin/python bench/bench_engine.py [--threads 2] [--from bench.json]

Runs `kernels.bench.bench` (what `apserve bench --json` prints) unless --from gives its saved JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def table(result: dict[str, Any]) -> str:
    rows = {(r["bits"], r["batch"]): r for r in result["rows"]}
    peers = {(p["name"], p["batch"]): p["ms_median"] for p in result["peers"]}
    lines = ["| bits | backend | batch 1 ms | batch 32 ms | batch 32 GMAC/s |", "| --- | --- | --- | --- | --- |"]
    for bits in sorted({b for b, _ in rows}, reverse=True):
        r1, r32 = rows.get((bits, 1)), rows.get((bits, 32))
        if r1 and r32:
            lines.append(
                f"| {bits} | {r32['backend']} | {r1['ms_median']:.3f} | {r32['ms_median']:.2f} | {r32['gmacs']:.1f} |"
            )
    for name in sorted({n for n, _ in peers}):
        macs = result["macs_per_image"]
        g = macs * 32 / (peers[(name, 32)] / 1000) / 1e9 if (name, 32) in peers else float("nan")
        lines.append(
            f"| peer | {name} | {peers.get((name, 1), float('nan')):.3f} | {peers.get((name, 32), float('nan')):.2f} | {g:.1f} |"
        )

    def lat(bits: int, batch: int) -> float:
        return float(rows[(bits, batch)]["ms_median"])

    checks = [
        ("batch 32: lat(8) <= 0.45 lat(32)", lat(8, 32) / lat(32, 32), 0.45),
        ("batch 32: lat(2) <= 0.8 lat(8)", lat(2, 32) / lat(8, 32), 0.8),
        ("batch 32: lat(1) <= 0.3 lat(8)", lat(1, 32) / lat(8, 32), 0.3),
        ("batch 1: lat(1) <= 0.5 lat(8)", lat(1, 1) / lat(8, 1), 0.5),
    ]
    if ("torch-fp32-eager", 32) in peers:
        checks.append(("batch 32: lat(8) <= 0.35 torch-fp32-eager", lat(8, 32) / peers[("torch-fp32-eager", 32)], 0.35))
    lines += ["", "| target | measured ratio | met |", "| --- | --- | --- |"]
    lines += [f"| {name} | {ratio:.2f} | {'yes' if ratio <= limit else 'no'} |" for name, ratio, limit in checks]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--from", dest="source", default=None, help="saved `apserve bench --json` output")
    args = parser.parse_args()
    if args.source:
        result = json.loads(Path(args.source).read_text())
    else:
        from kernels.bench import bench
        from model_store import artifact

        result = bench(artifact.load(), threads=args.threads)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
