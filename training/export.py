"""Export a trained model to the packed artifact (model_store format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_store import artifact, fashion_mnist
from training.model import BN_EPS, AnyPrecisionResNet, PreActBlock, SwitchableBN, macs_per_image
from training.quant import levels, lsq_scale, weight_codes8


def _bn_tables(prefix: str, bn: SwitchableBN) -> dict[str, np.ndarray]:
    """gamma, beta, running mean and variance, one row per bit-width in artifact.BITS order."""
    layers = [bn.bns[str(bits)] for bits in artifact.BITS]
    sources = {"gamma": "weight", "beta": "bias", "mean": "running_mean", "var": "running_var"}
    return {
        f"{prefix}.{p}": torch.stack([getattr(m, attr).detach().float() for m in layers]).numpy()
        for p, attr in sources.items()
    }


def _conv_tensors(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    codes8 = weight_codes8(w)
    scales = torch.stack([lsq_scale(w, levels(codes8, k)) for k in range(1, 9)])
    flat = codes8.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # (kh, kw, cin) order
    return artifact.pack_planes(flat.to(torch.uint8).numpy()), scales.float().numpy()


def tensors_of(model: AnyPrecisionResNet) -> dict[str, np.ndarray]:
    stem, *blocks, head = model.layers_spec
    out: dict[str, np.ndarray] = {f"{stem['name']}.weight": model.stem.weight.detach().numpy()}
    for spec, block in zip(blocks, model.blocks, strict=True):
        assert isinstance(block, PreActBlock)
        name = spec["name"]
        out.update(_bn_tables(f"{name}.bn1", block.bn1))
        out.update(_bn_tables(f"{name}.bn2", block.bn2))
        for conv in ("conv1", "conv2"):
            out[f"{name}.{conv}.planes"], out[f"{name}.{conv}.scales"] = _conv_tensors(getattr(block, conv).weight)
    name = head["name"]
    out.update(_bn_tables(f"{name}.bn", model.head_bn))
    out[f"{name}.fc.weight"] = model.fc.weight.detach().numpy()
    out[f"{name}.fc.bias"] = model.fc.bias.detach().numpy()
    return out


def export(
    model: AnyPrecisionResNet,
    path: Path,
    *,
    name: str = "fashion-resnet",
    accuracy: dict[str, dict[str, float]] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    manifest = {
        "name": name,
        "architecture": model.layers_spec,
        "input": {
            "name": "image",
            "shape": [1, 28, 28],
            "datatypes": ["UINT8", "FP32"],
            "range": {"UINT8": [0, 255], "FP32": [0.0, 1.0]},
        },
        "output": {"name": "logits", "shape": [len(fashion_mnist.LABELS)], "datatype": "FP32"},
        "labels": list(fashion_mnist.LABELS),
        "bits": list(artifact.BITS),
        "weights": "8 bit-planes per quantized conv, floor grid, k-bit codes = top k planes; "
        "bits 32 = float activations with the 8-bit weights; stem and classifier fp32",
        "activations": "k unsigned bits, clip [0, 1], zero point 0, round half up",
        "macs_per_image": macs_per_image(model.layers_spec),
        "bn_eps": BN_EPS,
        "accuracy": accuracy or {},
        "training": training or {},
    }
    return artifact.save(path, manifest, tensors_of(model))
