"""Memory: resident set of a process with every bits warmed vs one with only 8 bits warmed (target: at
most 1.5x). Each measurement runs in a fresh subprocess so the two do not share allocations. The engine
runs the backends of the model's saved profile, as the server does.

    .venv/bin/python bench/bench_engine_memory.py [--model PATH] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import sys
from kernels import profiler
from kernels.engine import Engine
from model_store import artifact, fashion_mnist
model = artifact.load(sys.argv[1])
engine = Engine(model, threads=int(sys.argv[2]), backends=profiler.saved_backends(model))
images = fashion_mnist.load("test").images[:64][:, None]
for bits in [int(b) for b in sys.argv[3].split(",")]:
    engine.run(images, bits)
    engine.run(images[:1], bits)
rss_kb = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS:")))
print(rss_kb)
"""


def rss_mib(model: str, threads: int, bits: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(threads), bits], check=True, capture_output=True, text=True
    )
    return int(out.stdout.split()[-1]) / 1024


def main() -> int:
    from model_store import artifact

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(artifact.BUNDLED))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    only8 = rss_mib(args.model, args.threads, "8")
    every = rss_mib(args.model, args.threads, "1,2,3,4,5,6,7,8,32")
    result = {
        "rss_mib_only_8": round(only8, 1),
        "rss_mib_all_bits": round(every, 1),
        "ratio": round(every / only8, 3),
        "target": 1.5,
    }
    print(
        f"RSS only 8 bits warmed {only8:.1f} MiB, all bits warmed {every:.1f} MiB: ratio {every / only8:.3f} (target <= 1.5)",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(result))
    return 0 if every <= 1.5 * only8 else 1


if __name__ == "__main__":
    sys.exit(main())
