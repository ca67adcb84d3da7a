"""Calibrate the cascade threshold on the validation split with the real engine.

    .venv/bin/python scripts/calibrate_cascade.py [--model PATH] [--low 1] [--high BITS] [--target ACC]
        [--limit N] [--out FILE]

Runs the 5,000 held-out validation images (never the test set) at the low and the high bits, then
policies.cascade.calibrate picks the smallest threshold on the low bits' top softmax probability whose
cascade accuracy reaches the target (default: 8 bits' validation accuracy less 0.1 point, the accuracy
the cascade is there to match). The high bits default to the cheapest Pareto bits of the model's saved
profile (latency at batch 32) whose validation accuracy is at least 8 bits' (4 on the bundled model,
8 without a profile): re-running the doubtful rows at 8 bits when 4 is as accurate spends energy for
nothing.
Prints the calibration JSON (stdout, or --out), which `apserve simulate --cascade-calibration FILE` and
the cascade policy's settings (threshold, low_bits, high_bits) use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels.engine import Engine  # noqa: E402
from model_store import artifact, fashion_mnist  # noqa: E402
from policies.cascade import calibrate  # noqa: E402
from policies.profile import ProfileError, load_profile  # noqa: E402

REFERENCE_BITS = 8  # the fixed precision the cascade is measured against


def escalation_bits(model: artifact.Artifact, model_path: Path) -> int:
    """The cheapest Pareto bits at least as accurate on validation as 8 bits (8 without a profile)."""
    accuracy = model.accuracy("validation")
    try:
        prof = load_profile(model_path.with_suffix(".profile.json"), accuracy)
    except (ProfileError, OSError):
        return REFERENCE_BITS
    floor = accuracy.get(REFERENCE_BITS)
    if floor is None:
        return REFERENCE_BITS
    good = [b for b in prof.latency.pareto if accuracy.get(b, 0.0) >= floor]
    return min(good, key=lambda b: prof.latency.latency(b, 32), default=REFERENCE_BITS)


def outputs(engine: Engine, images: np.ndarray, bits: int, batch: int = 256) -> np.ndarray:
    rows = [engine.run(images[i : i + batch, None], bits) for i in range(0, len(images), batch)]
    return np.concatenate(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=artifact.BUNDLED)
    p.add_argument("--low", type=int, default=1)
    p.add_argument("--high", type=int, default=None, help="escalation bits (default: see above)")
    p.add_argument("--target", type=float, default=None, help="cascade accuracy to reach (fraction)")
    p.add_argument("--limit", type=int, default=0, help="only the first N validation images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    model = artifact.load(args.model)
    _, validation = fashion_mnist.train_validation()
    images, labels = validation.images, validation.labels
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    high_bits = escalation_bits(model, args.model) if args.high is None else args.high
    engine = Engine(model, threads=args.threads)
    low = outputs(engine, images, args.low)
    high = outputs(engine, images, high_bits)
    target = args.target
    if target is None:
        reference = high if high_bits == REFERENCE_BITS else outputs(engine, images, REFERENCE_BITS)
        target = float((reference.argmax(1) == labels).mean()) - 0.001
    try:
        result = calibrate(low, high, labels, target, args.low, high_bits)
    except ValueError as exc:
        print(f"calibrate_cascade: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result.as_dict(), indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
