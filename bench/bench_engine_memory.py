"""Memory: resident set of a process with every bits warmed vs one with only 8 bits warmed (target: at
most 1.5x). Each measurement runs in a fresh subprocess so the two do not share allocations. The engine
runs the backends of the model's saved profile, as the server does. --steps also prints the resident set
after each step of warming every bits (8, then 7 down to 1, then the libraries fp32 imports, then fp32
itself): where the difference goes.

    .venv/bin/python bench/bench_engine_memory.py [--model PATH] [--threads N] [--steps] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# Warms the bits given (argv[3]) in that order and prints "step<TAB>RSS kB" after each step; before fp32
# it imports the libraries fp32 needs one by one, so that their share shows on its own.
CHILD = """
import sys
def rss_kb():
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS:")))
from kernels import profiler
from kernels.engine import Engine
from model_store import artifact, fashion_mnist
model = artifact.load(sys.argv[1])
engine = Engine(model, threads=int(sys.argv[2]), backends=profiler.saved_backends(model))
images = fashion_mnist.load("test").images[:64][:, None]
print("model loaded", rss_kb(), sep="\t")
for bits in [int(b) for b in sys.argv[3].split(",")]:
    if bits == 32:
        import onnx  # what the fp32 graph is built with
        print("import onnx", rss_kb(), sep="\t")
        import onnxruntime
        print("import onnxruntime", rss_kb(), sep="\t")
    engine.run(images, bits)
    engine.run(images[:1], bits)
    print(f"{bits} bits warmed ({engine.backend(bits)})", rss_kb(), sep="\t")
"""


def warm(model: str, threads: int, bits: str) -> list[tuple[str, float]]:
    """(step, RSS MiB after it) for warming ``bits`` (comma-separated, in order) in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(threads), bits], check=True, capture_output=True, text=True
    )
    return [(step, int(kb) / 1024) for step, kb in (line.rsplit("\t", 1) for line in out.stdout.splitlines())]


def main() -> int:
    from model_store import artifact

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(artifact.BUNDLED))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", action="store_true", help="also the RSS after each warming step")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    only8 = warm(args.model, args.threads, "8")[-1][1]
    trace = warm(args.model, args.threads, "8,7,6,5,4,3,2,1,32")
    every = trace[-1][1]
    result = {
        "rss_mib_only_8": round(only8, 1),
        "rss_mib_all_bits": round(every, 1),
        "ratio": round(every / only8, 3),
        "target": 1.5,
    }
    if args.steps:
        result["steps"] = [{"step": step, "rss_mib": round(mib, 1)} for step, mib in trace]
        print(f"{'step':<58} {'RSS MiB':>8} {'added':>7}", file=sys.stderr)
        for i, (step, mib) in enumerate(trace):
            added = f"{mib - trace[i - 1][1]:+7.1f}" if i else ""
            print(f"{step:<58} {mib:8.1f} {added:>7}", file=sys.stderr)
    print(
        f"RSS only 8 bits warmed {only8:.1f} MiB, all bits warmed {every:.1f} MiB: ratio {every / only8:.3f} (target <= 1.5)",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(result))
    return 0 if every <= 1.5 * only8 else 1


if __name__ == "__main__":
    sys.exit(main())
