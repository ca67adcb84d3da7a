"""The any-precision pre-activation ResNet for 28x28x1 images.

stem: fp32 5x5 conv 1->32 on pixels / 255. Then pre-activation blocks
``x + conv2(q(bn2(conv1(q(bn1(x))))))`` with quantized weights and activations, one BatchNorm per
bit-width (switchable BN), option-A shortcuts (subsample + zero channels) where the shape changes.
head: bn -> relu -> global average pool -> fp32 linear. The stem and the classifier stay fp32.

Every layer is described by ``architecture()``; the artifact stores that list so engines build the
network from the manifest alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.quant import BITS, quantize_activation, quantize_weight

STAGES = ((32, 2, 1), (64, 2, 2), (128, 2, 2))  # (width, blocks, stride of the first block)
NUM_CLASSES = 10
STEM_KERNEL = 5  # a 5x5 fp32 stem sees more context on 28x28 inputs (and lifts the model past 80 M MAC)


def architecture(stages=STAGES, num_classes: int = NUM_CLASSES) -> list[dict[str, Any]]:
    stem = {"type": "stem", "name": "stem", "in": 1, "out": stages[0][0], "kernel": STEM_KERNEL}
    layers: list[dict[str, Any]] = [stem]
    width = stages[0][0]
    for s, (out, blocks, stride) in enumerate(stages):
        for b in range(blocks):
            layers.append(
                {
                    "type": "preact_block",
                    "name": f"s{s + 1}b{b + 1}",
                    "in": width,
                    "out": out,
                    "stride": stride if b == 0 else 1,
                    "kernel": 3,
                }
            )
            width = out
    layers.append({"type": "head", "name": "head", "in": width, "out": num_classes})
    return layers


BN_EPS = 1e-5


class SwitchableBN(nn.Module):
    """One BatchNorm2d per bit-width; ``bits`` picks which."""

    def __init__(self, channels: int):
        super().__init__()
        self.bns = nn.ModuleDict({str(b): nn.BatchNorm2d(channels, eps=BN_EPS) for b in BITS})

    def forward(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        return self.bns[str(bits)](x)


class QConv(nn.Conv2d):
    def forward(self, x: torch.Tensor, bits: int) -> torch.Tensor:  # type: ignore[override]
        return F.conv2d(x, quantize_weight(self.weight, bits), None, self.stride, self.padding)


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.bn1 = SwitchableBN(cin)
        self.conv1 = QConv(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = SwitchableBN(cout)
        self.conv2 = QConv(cout, cout, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        h = self.conv1(quantize_activation(self.bn1(x, bits), bits), bits)
        h = self.conv2(quantize_activation(self.bn2(h, bits), bits), bits)
        return shortcut(x, self.cout, self.stride) + h


def shortcut(x: torch.Tensor, cout: int, stride: int) -> torch.Tensor:
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    if cout != x.shape[1]:
        x = F.pad(x, (0, 0, 0, 0, 0, cout - x.shape[1]))
    return x


class AnyPrecisionResNet(nn.Module):
    def __init__(self, layers: list[dict[str, Any]] | None = None):
        super().__init__()
        self.layers_spec = layers or architecture()
        stem, *blocks, head = self.layers_spec
        self.stem = nn.Conv2d(stem["in"], stem["out"], stem["kernel"], 1, stem["kernel"] // 2, bias=False)
        self.blocks = nn.ModuleList(PreActBlock(b["in"], b["out"], b["stride"]) for b in blocks)
        self.head_bn = SwitchableBN(head["in"])
        self.fc = nn.Linear(head["in"], head["out"])

    def forward(self, pixels: torch.Tensor, bits: int) -> torch.Tensor:
        """``pixels``: float [B, 1, 28, 28] in [0, 255] (uint8 values). Returns logits [B, 10]."""
        x = self.stem(pixels * (1.0 / 255.0))
        for block in self.blocks:
            x = block(x, bits)
        x = torch.relu(self.head_bn(x, bits)).mean(dim=(2, 3))
        return self.fc(x)


def macs_per_image(layers: list[dict[str, Any]] | None = None, size: int = 28) -> int:
    """Multiply-accumulates of one forward pass."""
    total, hw = 0, size
    for layer in layers or architecture():
        if layer["type"] == "stem":
            total += hw * hw * layer["kernel"] ** 2 * layer["in"] * layer["out"]
        elif layer["type"] == "preact_block":
            out_hw = (hw - 1) // layer["stride"] + 1
            total += out_hw * out_hw * 9 * layer["in"] * layer["out"]
            total += out_hw * out_hw * 9 * layer["out"] * layer["out"]
            hw = out_hw
        else:
            total += layer["in"] * layer["out"]
    return total
