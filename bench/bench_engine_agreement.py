"""Engine vs reference engine: argmax agreement on the full 10,000-image Fashion-MNIST test set, per bits
and backend (the CI test runs a subset). The backends are the saved profile's, as the server runs them,
unless --backend names one for every bits asked. Prints a table; --json prints JSON on stdout.

    .venv/bin/python bench/bench_engine_agreement.py [--model PATH] [--bits 1,2,8] [--backend NAME] [--limit N] [--json]

On a CPU without AVX-512, APSERVE_NATIVE_LIBRARY=<a build with -DAPQ_EMULATE_AVX512, as
tests/test_kernels_avx512_emulated.py makes it> and --backend native-avx512 or int8-avx512 check the
AVX-512 kernels' results (slowly: they run on SIMDe's portable intrinsics).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from kernels import profiler
from kernels.engine import Engine
from kernels.reference import ReferenceEngine
from model_store import artifact, fashion_mnist


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(artifact.BUNDLED))
    parser.add_argument("--bits", default=None, help="comma-separated bits (default: all)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N test images")
    parser.add_argument("--backend", default=None, help="this backend for every bits (default: the saved profile's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = artifact.load(args.model)
    test = fashion_mnist.load("test")
    n = args.limit or len(test)
    images = test.images[:n][:, None]
    bits_list = [int(b) for b in args.bits.split(",")] if args.bits else list(model.bits)
    backends = {bits: args.backend for bits in bits_list} if args.backend else profiler.saved_backends(model)
    engine, reference = Engine(model, threads=args.threads, backends=backends), ReferenceEngine(model)
    rows = []
    for bits in bits_list:
        t0 = time.perf_counter()
        disagree, max_diff = 0, 0.0
        for i in range(0, n, 500):
            got, want = engine.run(images[i : i + 500], bits), reference.run(images[i : i + 500], bits)
            disagree += int((got.argmax(1) != want.argmax(1)).sum())
            max_diff = max(max_diff, float(np.abs(got - want).max()))
        row = {
            "bits": bits,
            "backend": engine.backend(bits),
            "n": n,
            "agreement": 1 - disagree / n,
            "disagree": disagree,
            "max_abs_logit_diff": max_diff,
        }
        rows.append(row)
        print(
            f"{bits:>2} bits {row['backend']:<18} agreement {100 * row['agreement']:7.3f} % ({disagree} of {n} differ), max |dlogit| {max_diff:.2e}  [{time.perf_counter() - t0:.0f} s]",
            file=sys.stderr,
            flush=True,
        )
    if args.json:
        print(json.dumps({"model": model.name, "rows": rows}, indent=1))
    return 0 if all(r["disagree"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
