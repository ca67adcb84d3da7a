"""The reference engine: the artifact run at any bit-width in plain numpy, no torch.

It is the correctness oracle for every fast backend: readable first. It computes in float64 by default,
with BatchNorm unfolded as in training, so the only difference from the training graph (run in float64)
is the summation order: activation codes then land on the same side of every rounding boundary.
Activations flow NHWC; a conv is an explicit im2col in (kh, kw, cin) order, the artifact's order.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from model_store.artifact import Artifact, unpack_codes

FP32 = 32
# Images per pass: a 1,000-image pass allocates gigabytes of im2col temporaries (half its time went to the
# kernel mapping them); 16 keep them in cache and malloc's arena, 2x faster. An image's arithmetic does
# not depend on its batch mates, so the logits are the same bit for bit.
CHUNK = 16


def to_input(batch: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """uint8 pixels 0..255 or float32 in [0, 1], [B, 1, 28, 28] or [B, 784] -> NHWC [B, 28, 28, 1]."""
    x = np.asarray(batch)
    x = x.astype(dtype) * dtype(1.0 / 255.0) if x.dtype == np.uint8 else x.astype(dtype, copy=False)
    return x.reshape(x.shape[0], 28, 28, 1)


def im2col(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """NHWC [B, H, W, C] -> [B, Ho, Wo, kernel*kernel*C] patches with zero padding kernel // 2."""
    pad = kernel // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    b, h, w, c = x.shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    cols = np.empty((b, ho, wo, kernel, kernel, c), dtype=x.dtype)
    for i in range(kernel):
        for j in range(kernel):
            cols[:, :, :, i, j, :] = xp[
                :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :
            ]
    return cols.reshape(b, ho, wo, kernel * kernel * c)


def dequantized_weight(artifact: Artifact, conv: str, bits: int, k: int, dtype: type = np.float64) -> np.ndarray:
    """[K, cout] weights of ``conv`` at ``bits`` (32 uses the 8-bit weights). Exact in float64: the
    levels are dyadic and the scales float32."""
    wb = min(bits, 8)
    codes: np.ndarray = unpack_codes(artifact.tensors[f"{conv}.planes"], wb, k).astype(dtype)
    n = float(1 << wb)
    levels = (2.0 * codes + 1.0 - n) / n
    scale = artifact.tensors[f"{conv}.scales"][wb - 1].astype(dtype)
    return np.ascontiguousarray((levels * scale[:, None]).T, dtype=dtype)


def quantize_activation(a: np.ndarray, bits: int) -> np.ndarray:
    if bits == FP32:
        return np.maximum(a, 0.0)
    n = a.dtype.type((1 << bits) - 1)
    return np.floor(np.clip(a, 0.0, 1.0) * n + a.dtype.type(0.5)) / n


class ReferenceEngine:
    """``run(batch, bits) -> logits``; per-bits dequantized weights are built lazily and cached."""

    def __init__(self, artifact: Artifact, dtype: type = np.float64):
        self.artifact = artifact
        self.dtype = dtype
        self._weights: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def _weight(self, layer: dict[str, Any], conv: str, bits: int) -> np.ndarray:
        key = (f"{layer['name']}.{conv}", bits)
        with self._lock:
            if key not in self._weights:
                cin = layer["in"] if conv == "conv1" else layer["out"]
                self._weights[key] = dequantized_weight(self.artifact, key[0], bits, 9 * cin, self.dtype)
            return self._weights[key]

    def run(self, batch: np.ndarray, bits: int) -> np.ndarray:
        if bits not in self.artifact.bits:
            raise ValueError(f"bits {bits} not servable; choose one of {self.artifact.bits}")
        x = to_input(batch, self.dtype)
        if len(x) <= CHUNK:
            return self._run(x, bits)
        return np.concatenate([self._run(x[i : i + CHUNK], bits) for i in range(0, len(x), CHUNK)])

    def _run(self, x: np.ndarray, bits: int) -> np.ndarray:
        art = self.artifact
        for layer in art.architecture:
            name = layer["name"]
            if layer["type"] == "stem":
                w: np.ndarray = art.tensors[f"{name}.weight"].astype(self.dtype)
                wk = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1).T
                x = im2col(x, layer["kernel"], 1) @ wk
            elif layer["type"] == "preact_block":
                h = quantize_activation(self._bn(f"{name}.bn1", bits, x), bits)
                h = im2col(h, 3, layer["stride"]) @ self._weight(layer, "conv1", bits)
                h = quantize_activation(self._bn(f"{name}.bn2", bits, h), bits)
                h = im2col(h, 3, 1) @ self._weight(layer, "conv2", bits)
                x = shortcut(x, layer["out"], layer["stride"]) + h
            else:
                pooled = np.maximum(self._bn(f"{name}.bn", bits, x), 0.0).mean(axis=(1, 2))
                fc: np.ndarray = art.tensors[f"{name}.fc.weight"].astype(self.dtype)
                x = pooled @ fc.T + art.tensors[f"{name}.fc.bias"].astype(self.dtype)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _bn(self, name: str, bits: int, x: np.ndarray) -> np.ndarray:
        """BatchNorm in inference form, in the order torch computes it."""
        params: list[np.ndarray] = [np.asarray(p, dtype=self.dtype) for p in self.artifact.bn_params(name, bits)]
        gamma, beta, mean, var = params
        return (x - mean) / np.sqrt(var + self.dtype(self.artifact.bn_eps)) * gamma + beta


def shortcut(x: np.ndarray, cout: int, stride: int) -> np.ndarray:
    """Option-A shortcut on NHWC: subsample, then zero channels up to ``cout``."""
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    if x.shape[3] != cout:
        x = np.pad(x, ((0, 0), (0, 0), (0, 0), (0, cout - x.shape[3])))
    return x
