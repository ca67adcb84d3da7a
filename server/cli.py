"""The `apserve` command. JSON (--json) goes to stdout alone; progress and logs go to stderr.

Each subcommand's work lives in its own room; this module only parses arguments and imports lazily,
so `apserve serve` never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from model_store.artifact import BITS, BUNDLED, ArtifactError


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=1) + "\n")


def _bits_arg(text: str) -> list[int]:
    try:
        bits = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be a comma-separated list of {list(BITS)}") from None
    bad = [b for b in bits if b not in BITS]
    if bad:
        raise argparse.ArgumentTypeError(f"bits {bad} not servable; choose from {list(BITS)}")
    return bits


def cmd_train(args: argparse.Namespace) -> int:
    from training.cli import run_train

    return run_train(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from kernels.engine import Engine
    from kernels.evaluate import accuracy
    from kernels.reference import ReferenceEngine
    from model_store import artifact, fashion_mnist

    model = artifact.load(args.model)
    test = fashion_mnist.load("test")
    if args.limit:
        test = fashion_mnist.Split(test.images[: args.limit], test.labels[: args.limit])
    runner = ReferenceEngine(model) if args.reference else Engine(model, threads=args.threads)
    acc = accuracy(runner.run, test, args.bits, progress=not args.quiet)
    result = {"model": model.name, "n": len(test), "accuracy": {str(b): acc[b] for b in args.bits}}
    if args.json:
        _print_json(result)
    else:
        print(f"{model.name} on {len(test)} Fashion-MNIST test images")
        for b in args.bits:
            print(f"  {b:>2} bits  {100 * acc[b]:6.2f} %")
    return 0


def _not_yet(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"apserve {name}: not implemented yet", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apserve", description="Adaptive inference server for any-precision networks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the any-precision model (or a dedicated baseline) and write the artifact")
    p.add_argument("--recipe", default="default", help="recipe name under training/recipes or a YAML path")
    p.add_argument("--out", type=Path, default=None, help="run directory for checkpoints (default runs/RECIPE)")
    p.add_argument("--artifact", type=Path, default=None, help="artifact to write (default: runs/RECIPE/model.apm)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy per bit-width on the 10,000-image Fashion-MNIST test set")
    p.add_argument("--model", type=Path, default=BUNDLED, help="artifact path (default: the bundled model)")
    p.add_argument("--bits", type=_bits_arg, default=list(BITS), help="comma-separated bits (default: all)")
    p.add_argument("--limit", type=int, default=0, help="only the first N test images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reference", action="store_true", help="use the numpy reference engine")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    for name, text in (
        ("serve", "serve the model over HTTP (KServe v2)"),
        ("profile", "measure latency per (bits, batch) and pick backends"),
        ("bench", "benchmark the engine against peers"),
        ("simulate", "discrete-event simulation of a policy on a trace"),
        ("loadtest", "run Locust against a server and write a report"),
    ):
        p = sub.add_parser(name, help=text)
        p.set_defaults(func=_not_yet(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ArtifactError as exc:
        print(f"apserve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
