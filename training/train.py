"""The any-precision trainer: recipe in, checkpoints and a trained model out.

One optimizer step sums the losses of several bit-widths (highest first). The highest trains on labels;
every lower one learns from the softmax of the next higher one in the same step (recursive distillation,
Yu et al.). Checkpoints hold everything needed to resume bit-for-bit where the run stopped.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from model_store import fashion_mnist
from training.model import AnyPrecisionResNet, SwitchableBN
from training.quant import BITS

RECIPES = Path(__file__).parent / "recipes"


@dataclass
class Recipe:
    seed: int = 0
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-3
    warmup_fraction: float = 0.05
    threads: int = 2
    hflip: bool = True
    always_bits: list[int] = field(default_factory=lambda: [32, 1])
    sampled_bits: dict[int, float] = field(default_factory=dict)
    checkpoint_every: int = 50
    calibration_batches: int = 40
    init: str | None = None  # a previous run's final.pt whose weights this run starts from (fine-tuning)
    name: str = "default"

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.exists() and (RECIPES / path).exists():
            path = RECIPES / path
        if not path.exists() and (RECIPES / f"{path}.yaml").exists():
            path = RECIPES / f"{path}.yaml"
        raw: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
        base = raw.pop("base", None)
        values: dict[str, Any] = {}
        if base:
            values = Recipe.load(path.parent / base).as_dict()
        values.update(raw)
        values["name"] = path.stem
        values["sampled_bits"] = {int(k): float(v) for k, v in (values.get("sampled_bits") or {}).items()}
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown recipe keys {sorted(unknown)}")
        recipe = cls(**values)
        for bits in [*recipe.always_bits, *recipe.sampled_bits]:
            if bits not in BITS:
                raise ValueError(f"{path}: bits {bits} not in {BITS}")
        return recipe

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @property
    def trained_bits(self) -> list[int]:
        return sorted({*self.always_bits, *self.sampled_bits}, reverse=True)


def _math_of(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe less the settings that do not change what is computed (threads, checkpointing)."""
    return {k: v for k, v in recipe.items() if k not in ("threads", "checkpoint_every", "name")}


def step_bits(recipe: Recipe, rng: random.Random) -> list[int]:
    """The bit-widths of one step, highest first."""
    chosen = set(recipe.always_bits)
    if recipe.sampled_bits:
        bits, weights = zip(*recipe.sampled_bits.items(), strict=False)
        chosen.add(rng.choices(bits, weights)[0])
    return sorted(chosen, reverse=True)


def lr_at(recipe: Recipe, step: int, total: int) -> float:
    warmup = max(1, int(recipe.warmup_fraction * total))
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def augment(x: torch.Tensor, gen: torch.Generator, hflip: bool) -> torch.Tensor:
    if hflip:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def as_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] pixel values 0..255, channels-last."""
    t = torch.from_numpy(np.ascontiguousarray(images)).float().unsqueeze(1)
    return t.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate(model: AnyPrecisionResNet, split: fashion_mnist.Split, bits: int, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(split), batch):
        x = as_input(split.images[i : i + batch])
        pred = model(x, bits).argmax(1).numpy()
        correct += int((pred == split.labels[i : i + batch]).sum())
    return correct / len(split)


@torch.no_grad()
def calibrate_bn(model: AnyPrecisionResNet, split: fashion_mnist.Split, recipe: Recipe) -> None:
    """Re-estimate every bit-width's BatchNorm statistics as exact averages over the validation split.
    Bit-widths never trained keep the affine parameters of the nearest trained bit-width above them."""
    trained = recipe.trained_bits
    for bits in BITS:
        if bits not in trained:
            donor = min((b for b in trained if b > bits), default=max(trained))
            for module in model.modules():
                if isinstance(module, SwitchableBN):
                    module.bns[str(bits)].load_state_dict(module.bns[str(donor)].state_dict())
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    n = min(len(split), recipe.calibration_batches * recipe.batch_size)
    for bits in BITS:
        for i in range(0, n, recipe.batch_size):
            model(as_input(split.images[i : i + recipe.batch_size]), bits)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def train(recipe: Recipe, out_dir: Path, resume: bool = True) -> tuple[AnyPrecisionResNet, dict[str, Any]]:
    """Train (or resume) and return the calibrated model with a summary of the run."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_split, val_split = fashion_mnist.train_validation(recipe.seed)
    model = AnyPrecisionResNet()
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch's stubs
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = len(train_split) // recipe.batch_size
    total = recipe.epochs * steps_per_epoch
    rng = random.Random(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    step, elapsed, history = 0, 0.0, []
    parent = None
    if recipe.init:
        # Fine-tuning continues a finished run: its weights (BN calibrated) start this one, and its summary
        # travels into ours so the artifact's provenance names every run that shaped the weights.
        init = torch.load(recipe.init, weights_only=False)
        model.load_state_dict(init["model"])
        parent = init["summary"]
    ckpt = out_dir / "checkpoint.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if _math_of(state["recipe"]) != _math_of(recipe.as_dict()):
            raise ValueError(f"{ckpt} was written by another recipe; use a fresh --out directory")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        gen.set_state(state["gen"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        print(f"resumed from {ckpt} at step {step}/{total}", file=sys.stderr)

    def save() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {
                "recipe": recipe.as_dict(),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": rng.getstate(),
                "gen": gen.get_state(),
                "step": step,
                "elapsed": elapsed,
                "history": history,
            },
            tmp,
        )
        tmp.replace(ckpt)

    bar = tqdm(total=total, initial=step, desc=f"train {recipe.name}", file=sys.stderr, dynamic_ncols=True)
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        order = np.random.default_rng(recipe.seed + epoch).permutation(len(train_split))
        idx = order[i * recipe.batch_size : (i + 1) * recipe.batch_size]
        t0 = time.perf_counter()
        model.train()
        x = augment(as_input(train_split.images[idx]), gen, recipe.hflip)
        y = torch.from_numpy(train_split.labels[idx].astype(np.int64))
        for group in opt.param_groups:
            group["lr"] = lr_at(recipe, step, total)
        opt.zero_grad(set_to_none=True)
        teacher: torch.Tensor | None = None
        losses = {}
        for bits in step_bits(recipe, rng):
            logits = model(x, bits)
            if teacher is None:
                loss = F.cross_entropy(logits, y)
            else:
                loss = -(teacher * F.log_softmax(logits, 1)).sum(1).mean()
            loss.backward()
            teacher = F.softmax(logits.detach(), 1)
            losses[bits] = round(loss.item(), 4)
        opt.step()
        step += 1
        elapsed += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix({str(k): v for k, v in losses.items()})
        if step % steps_per_epoch == 0 or step == total:
            accs = {b: round(evaluate(model, val_split, b), 4) for b in (32, 8, 4, 2, 1)}
            history.append({"step": step, "epoch": step / steps_per_epoch, "val_accuracy": accs})
            print(f"\nepoch {step / steps_per_epoch:.2f} validation {accs}", file=sys.stderr)
        if step % recipe.checkpoint_every == 0 or step == total:
            save()
    bar.close()
    calibrate_bn(model, val_split, recipe)
    summary = {
        "recipe": recipe.as_dict(),
        "steps": total,
        "train_seconds": round(elapsed, 1),
        "history": history,
        "machine": machine_name(),
    }
    if parent is not None:
        summary["initialised_from"] = {"path": recipe.init, "summary": parent}
    torch.save({"model": model.state_dict(), "summary": summary}, out_dir / "final.pt")
    return model, summary


def machine_name() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"
