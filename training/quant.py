"""Quantizers, trained through exactly as they are served.

Weights: a per-output-channel floor ("mid-rise") grid on 8 bits. The k-bit code is the top k bits of
the 8-bit code, ``code_k = code_8 >> (8 - k)``, so every bit-width reads a prefix of the same stored
bit-planes. The k-bit weight is ``scale_k * (2 * code_k + 1 - 2**k) / 2**k`` where ``scale_k`` is the
least-squares scale for those codes (per output channel): for k = 1 it is XNOR-Net's mean |w|.

Activations: k unsigned bits, clip [0, 1], zero point 0, round half up: ``floor(a * (2**k - 1) + 0.5)``.
The switchable BatchNorm before each quantizer learns to place values in [0, 1].
"""

from __future__ import annotations

import torch

FP32 = 32
BITS = (1, 2, 3, 4, 5, 6, 7, 8, FP32)


def weight_codes8(w: torch.Tensor) -> torch.Tensor:
    """8-bit floor-grid codes (float tensor holding integers 0..255), per output channel (dim 0).
    Always computed in float32, so a float64 copy of the model quantizes to the same codes."""
    flat = w.detach().float().flatten(1)
    span = flat.abs().amax(dim=1).clamp_min(1e-8)
    u = (flat / span[:, None] + 1.0) * 128.0  # [0, 256]
    return torch.clamp(torch.floor(u), 0, 255).view(w.shape).to(w.dtype)


def levels(codes8: torch.Tensor, bits: int) -> torch.Tensor:
    """Mid-rise levels in (-1, 1) of the k-bit codes taken as the top k bits of the 8-bit codes."""
    codes = torch.floor(codes8 / float(1 << (8 - bits)))
    n = float(1 << bits)
    return (2.0 * codes + 1.0 - n) / n


def lsq_scale(w: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scale minimising ||w - s * lv||^2 (in float32, as stored in the artifact)."""
    wf, lf = w.detach().float().flatten(1), lv.float().flatten(1)
    return ((wf * lf).sum(1) / (lf * lf).sum(1).clamp_min(1e-12)).to(w.dtype)


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantized weight at ``bits`` (1..8; 32 serves the 8-bit weights), straight-through."""
    lv = levels(weight_codes8(w), min(bits, 8))
    scale = lsq_scale(w, lv)
    wq = lv * scale.view(-1, *([1] * (w.dim() - 1)))
    return w + (wq - w).detach()


def quantize_activation(a: torch.Tensor, bits: int) -> torch.Tensor:
    """ReLU, then for bits <= 8 clip to [0, 1] and round to 2**bits - 1 steps (straight-through)."""
    if bits == FP32:
        return torch.relu(a)
    n = float((1 << bits) - 1)
    clipped = torch.clamp(a, 0.0, 1.0)
    q = torch.floor(clipped * n + 0.5) / n
    return clipped + (q - clipped).detach()
