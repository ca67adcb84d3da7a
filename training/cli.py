"""`apserve train`: train, calibrate, measure accuracy, write the artifact."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from model_store import artifact, fashion_mnist
from training.check import max_relative_difference
from training.export import export
from training.model import AnyPrecisionResNet
from training.train import Recipe, evaluate, train


def run_train(args: argparse.Namespace) -> int:
    recipe = Recipe.load(args.recipe)
    out = args.out or Path("runs") / recipe.name
    model, summary = train(recipe, out, resume=not args.no_resume)
    return finish(model, summary, recipe, args.artifact or out / "model.apm", json_out=args.json)


def finish(
    model: AnyPrecisionResNet, summary: dict[str, Any], recipe: Recipe, path: Path, json_out: bool = False
) -> int:
    """Measure accuracy per bits on validation and test (the torch model computes exactly what the
    artifact serves; tests hold the reference engine to it) and write the artifact."""
    _, val = fashion_mnist.train_validation(recipe.seed)
    test = fashion_mnist.load("test")
    bits = recipe.trained_bits if len(recipe.trained_bits) == 1 else list(artifact.BITS)
    acc = {
        "validation": {str(b): evaluate(model, val, b) for b in bits},
        "test": {str(b): evaluate(model, test, b) for b in bits},
    }
    export(model, path, accuracy=acc, training=summary)
    diff = max_relative_difference(model, artifact.load(path), test.images[:256])
    if max(diff.values()) > 1e-3:
        raise RuntimeError(f"the exported artifact does not reproduce the model: {diff}")
    summary = {**summary, "reference_max_relative_difference": {str(b): d for b, d in diff.items()}}
    export(model, path, accuracy=acc, training=summary)
    result = {"artifact": str(path), "recipe": recipe.name, "accuracy": acc, "train_seconds": summary["train_seconds"]}
    print(json.dumps(result, indent=1), file=sys.stdout if json_out else sys.stderr)
    return 0
