"""onnxruntime graphs built in memory from the artifact (onnx helper API; no torch, no files).

- ``fp32_graph``: the bits-32 network (ReLU activations, the 8-bit weights dequantized), NCHW float32
  convs, which onnxruntime runs near the fp32 peak.
- ``int8_graph(k)`` for k in 3..8: every quantized conv is a MatMulInteger on the k-bit activation codes
  (uint8, zero point 0) against the k-bit weight codes, on an im2col made of Pad + Slice + Concat, in the
  artifact's (kh, kw, cin) row order. The integer result is exact: for k <= 7 the int8 weights are the
  mid-rise levels 2c + 1 - 2^k themselves (|w| <= 127, so even AVX2's saturating u8 x s8 pair sums stay
  exact); for k = 8 the weights are the uint8 codes with zero point 128 and one extra all-ones column
  (code 129) gives the per-pixel activation sum for the +1/2 of the mid-rise level:
  I = 2 * sum((c - 128) a) + sum(a). Everything float around the integer convs (stem, BN, requantization,
  residual, head) is float64; BN, the conv scale and the requantizer fold into one multiply-add, which
  differs from the reference's float64 only in the last bits (the profiler checks agreement).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kernels.reference import dequantized_weight
from model_store.artifact import Artifact, unpack_codes

OPSET = 17


class _Graph:
    """A tiny builder: named nodes and constant initializers."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs: Any) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def model(self, inp: onnx.ValueInfoProto, out: str, out_type: int, out_shape: list[Any]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "apserve", [inp], [helper.make_tensor_value_info(out, out_type, out_shape)], self.inits
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def _conv_weight_nchw(artifact: Artifact, conv: str, cin: int) -> np.ndarray:
    """The 8-bit weights dequantized, [cout, cin, 3, 3] float32, from the (kh, kw, cin) rows."""
    w = dequantized_weight(artifact, conv, 32, 9 * cin)  # [K, cout] float64, exact
    return np.ascontiguousarray(w.reshape(3, 3, cin, -1).transpose(3, 2, 0, 1), dtype=np.float32)


def fp32_graph(artifact: Artifact) -> onnx.ModelProto:
    g = _Graph()
    layers = artifact.architecture
    x = "image"
    for layer in layers:
        name = layer["name"]
        if layer["type"] == "stem":
            w = np.ascontiguousarray(artifact.tensors[f"{name}.weight"], dtype=np.float32)
            x = g.op("Conv", [x, g.const(w, "stem_w")], pads=[2, 2, 2, 2])
        elif layer["type"] == "preact_block":
            cin, cout, stride = layer["in"], layer["out"], layer["stride"]

            def bn_relu(t: str, bn: str, c: int) -> str:
                scale, shift = artifact.bn(bn, 32)
                t = g.op("Mul", [t, g.const(scale.reshape(1, c, 1, 1))])
                return g.op("Relu", [g.op("Add", [t, g.const(shift.reshape(1, c, 1, 1))])])

            h = bn_relu(x, f"{name}.bn1", cin)
            w1 = _conv_weight_nchw(artifact, f"{name}.conv1", cin)
            h = g.op("Conv", [h, g.const(w1, "w")], pads=[1, 1, 1, 1], strides=[stride, stride])
            h = bn_relu(h, f"{name}.bn2", cout)
            w2 = _conv_weight_nchw(artifact, f"{name}.conv2", cout)
            h = g.op("Conv", [h, g.const(w2, "w")], pads=[1, 1, 1, 1])
            x = g.op("Add", [_shortcut(g, x, cin, cout, stride, channel_axis=1), h])
        else:
            scale, shift = artifact.bn(f"{name}.bn", 32)
            c = layer["in"]
            t = g.op(
                "Relu",
                [
                    g.op(
                        "Add",
                        [g.op("Mul", [x, g.const(scale.reshape(1, c, 1, 1))]), g.const(shift.reshape(1, c, 1, 1))],
                    )
                ],
            )
            t = g.op("ReduceMean", [t], axes=[2, 3], keepdims=0)
            fc_w = np.ascontiguousarray(artifact.tensors[f"{name}.fc.weight"], dtype=np.float32)
            fc_b = np.ascontiguousarray(artifact.tensors[f"{name}.fc.bias"], dtype=np.float32)
            x = g.op("Gemm", [t, g.const(fc_w), g.const(fc_b)], transB=1)
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])
    return g.model(inp, x, TensorProto.FLOAT, ["batch", layers[-1]["out"]])


def _shortcut(g: _Graph, x: str, cin: int, cout: int, stride: int, channel_axis: int) -> str:
    """Option-A shortcut: subsample spatially, zero channels up to cout."""
    spatial = [2, 3] if channel_axis == 1 else [1, 2]
    if stride != 1:
        big = np.iinfo(np.int64).max
        x = g.op("Slice", [x, g.const(np.array([0, 0], np.int64)), g.const(np.array([big, big], np.int64)),
                           g.const(np.array(spatial, np.int64)), g.const(np.array([stride, stride], np.int64))])  # fmt: skip
    if cout != cin:
        pads = np.zeros(8, np.int64)
        pads[4 + channel_axis] = cout - cin
        x = g.op("Pad", [x, g.const(pads)])
    return x


def _im2col_nhwc(g: _Graph, x: str, size: int, kernel: int, stride: int) -> str:
    """[B, H, W, C] -> [B, Ho, Wo, kernel*kernel*C] in (kh, kw, c) order, zero padding kernel // 2."""
    pad = kernel // 2
    xp = g.op("Pad", [x, g.const(np.array([0, pad, pad, 0, 0, pad, pad, 0], np.int64))])
    out = (size - 1) // stride + 1
    axes, steps = g.const(np.array([1, 2], np.int64)), g.const(np.array([stride, stride], np.int64))
    parts = []
    for i in range(kernel):
        for j in range(kernel):
            starts = g.const(np.array([i, j], np.int64))
            ends = g.const(np.array([i + stride * (out - 1) + 1, j + stride * (out - 1) + 1], np.int64))
            parts.append(g.op("Slice", [xp, starts, ends, axes, steps]))
    return g.op("Concat", parts, axis=3)


def int8_graph(artifact: Artifact, bits: int) -> onnx.ModelProto:
    if not 3 <= bits <= 8:
        raise ValueError(f"the int8 graph serves 3..8 bits, not {bits}")
    g = _Graph()
    n = float((1 << bits) - 1)
    layers = artifact.architecture
    f64 = np.float64

    def codes(t: str, name: str, pre: np.ndarray | float = 1.0) -> str:
        """uint8 codes floor(clip(bn(pre * t), 0, 1) * n + 0.5), folded into one multiply-add in float64:
        clip(z * n + 0.5, 0.5, n + 0.5) with z * n + 0.5 = t * (pre * scale * n) + (shift * n + 0.5)."""
        gamma, beta, mean, var = (p.astype(f64) for p in artifact.bn_params(name, bits))
        scale = gamma / np.sqrt(var + f64(artifact.bn_eps))
        shift = beta - mean * scale
        t = g.op("Add", [g.op("Mul", [t, g.const(pre * scale * n)]), g.const(shift * n + 0.5)])
        t = g.op("Floor", [g.op("Clip", [t, g.const(np.array(0.5)), g.const(np.array(n + 0.5))])])
        return g.op("Cast", [t], to=TensorProto.UINT8)

    def qconv(a: str, conv: str, cin: int, size: int, stride: int) -> str:
        """Integer conv outputs I (as float64) of the uint8 codes ``a`` [B, H, W, cin]."""
        cols = _im2col_nhwc(g, a, size, 3, stride)
        c = unpack_codes(artifact.tensors[f"{conv}.planes"], bits, 9 * cin).T  # [K, cout] uint8 codes
        if bits <= 7:
            w = (2 * c.astype(np.int16) + 1 - (1 << bits)).astype(np.int8)
            return g.op(
                "Cast", [g.op("MatMulInteger", [cols, g.const(np.ascontiguousarray(w), "wq")])], to=TensorProto.DOUBLE
            )
        ones = np.full((c.shape[0], 1), 129, np.uint8)
        w8 = np.ascontiguousarray(np.concatenate([c, ones], axis=1))
        m = g.op(
            "MatMulInteger", [cols, g.const(w8, "wq"), g.const(np.array(0, np.uint8)), g.const(np.array(128, np.uint8))]
        )
        m = g.op("Cast", [m], to=TensorProto.DOUBLE)
        cout = c.shape[1]
        axis = g.const(np.array([3], np.int64))
        dot = g.op("Slice", [m, g.const(np.array([0], np.int64)), g.const(np.array([cout], np.int64)), axis])
        asum = g.op("Slice", [m, g.const(np.array([cout], np.int64)), g.const(np.array([cout + 1], np.int64)), axis])
        return g.op("Add", [g.op("Mul", [dot, g.const(np.array(2.0))]), asum])

    x, size = "image", 28
    for layer in layers:
        name = layer["name"]
        if layer["type"] == "stem":
            kk = layer["kernel"]
            w = artifact.tensors[f"{name}.weight"].astype(f64)
            wk = np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1).T)  # [(kh, kw, 1), cout]
            x = g.op("MatMul", [_im2col_nhwc(g, x, size, kk, 1), g.const(wk, "stem_w")])
        elif layer["type"] == "preact_block":
            cin, cout, stride = layer["in"], layer["out"], layer["stride"]
            scale1 = artifact.tensors[f"{name}.conv1.scales"][bits - 1].astype(f64) / ((n + 1) * n)
            scale2 = artifact.tensors[f"{name}.conv2.scales"][bits - 1].astype(f64) / ((n + 1) * n)
            h = qconv(codes(x, f"{name}.bn1"), f"{name}.conv1", cin, size, stride)
            out_size = (size - 1) // stride + 1
            h = codes(h, f"{name}.bn2", scale1)
            h = g.op("Mul", [qconv(h, f"{name}.conv2", cout, out_size, 1), g.const(scale2)])
            x = g.op("Add", [_shortcut(g, x, cin, cout, stride, channel_axis=3), h])
            size = out_size
        else:
            gamma, beta, mean, var = (p.astype(f64) for p in artifact.bn_params(f"{name}.bn", bits))
            denom = np.sqrt(var + f64(artifact.bn_eps))
            t = g.op("Div", [g.op("Sub", [x, g.const(mean)]), g.const(denom)])
            t = g.op("Relu", [g.op("Add", [g.op("Mul", [t, g.const(gamma)]), g.const(beta)])])
            t = g.op("ReduceMean", [t], axes=[1, 2], keepdims=0)
            fc_w = np.ascontiguousarray(artifact.tensors[f"{name}.fc.weight"].astype(f64).T)
            t = g.op(
                "Add", [g.op("MatMul", [t, g.const(fc_w)]), g.const(artifact.tensors[f"{name}.fc.bias"].astype(f64))]
            )
            x = g.op("Cast", [t], to=TensorProto.FLOAT)
    inp = helper.make_tensor_value_info("image", TensorProto.DOUBLE, ["batch", 28, 28, 1])
    return g.model(inp, x, TensorProto.FLOAT, ["batch", layers[-1]["out"]])


def fp32_codes_graph(artifact: Artifact, bits: int) -> onnx.ModelProto:
    """Any k in 1..8 on onnxruntime's fp32 convs, still exact: the activations are the integer codes and
    the weights the integer mid-rise levels 2c + 1 - 2^k, both held exactly in float32, and every partial
    sum of the conv stays below 2^24 in magnitude for k <= 6 (|I| <= 9 cin n^2), so the fp32 conv returns
    the exact integer I. For k = 7, 8 only an adversarial input reaches 2^24; the profiler checks agreement.
    Where int8 dot products are not faster than fp32 FMA (CPUs without VNNI) this beats the int8 graph.
    Layout NCHW; the stem, BN, requantization, residual and head are float64 as in ``int8_graph``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"the fp32-codes graph serves 1..8 bits, not {bits}")
    g = _Graph()
    n = float((1 << bits) - 1)
    f64 = np.float64

    def folded(name: str) -> tuple[np.ndarray, np.ndarray]:
        gamma, beta, mean, var = (p.astype(f64) for p in artifact.bn_params(name, bits))
        scale = gamma / np.sqrt(var + f64(artifact.bn_eps))
        return scale, beta - mean * scale

    def codes(t: str, name: str, pre: np.ndarray | float = 1.0) -> str:
        scale, shift = folded(name)
        c = scale.shape[0]
        t = g.op(
            "Add",
            [
                g.op("Mul", [t, g.const((pre * scale * n).reshape(1, c, 1, 1))]),
                g.const((shift * n + 0.5).reshape(1, c, 1, 1)),
            ],
        )
        t = g.op("Floor", [g.op("Clip", [t, g.const(np.array(0.5)), g.const(np.array(n + 0.5))])])
        return g.op("Cast", [t], to=TensorProto.FLOAT)

    def qconv(a: str, conv: str, cin: int, stride: int) -> str:
        c = unpack_codes(artifact.tensors[f"{conv}.planes"], bits, 9 * cin).astype(np.float32)  # [cout, K]
        levels = 2 * c + 1 - (1 << bits)
        w = np.ascontiguousarray(levels.reshape(-1, 3, 3, cin).transpose(0, 3, 1, 2))
        t = g.op("Conv", [a, g.const(w, "wq")], pads=[1, 1, 1, 1], strides=[stride, stride])
        return g.op("Cast", [t], to=TensorProto.DOUBLE)

    x, size = "image", 28
    for layer in artifact.architecture:
        name = layer["name"]
        if layer["type"] == "stem":
            kk = layer["kernel"]
            w = artifact.tensors[f"{name}.weight"].astype(f64)
            wk = np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1).T)
            x = g.op("MatMul", [_im2col_nhwc(g, x, size, kk, 1), g.const(wk, "stem_w")])
            x = g.op("Transpose", [x], perm=[0, 3, 1, 2])
        elif layer["type"] == "preact_block":
            cin, cout, stride = layer["in"], layer["out"], layer["stride"]
            scale1 = artifact.tensors[f"{name}.conv1.scales"][bits - 1].astype(f64) / ((n + 1) * n)
            scale2 = artifact.tensors[f"{name}.conv2.scales"][bits - 1].astype(f64) / ((n + 1) * n)
            h = qconv(codes(x, f"{name}.bn1"), f"{name}.conv1", cin, stride)
            h = codes(h, f"{name}.bn2", scale1)
            h = g.op("Mul", [qconv(h, f"{name}.conv2", cout, 1), g.const(scale2.reshape(1, cout, 1, 1))])
            x = g.op("Add", [_shortcut(g, x, cin, cout, stride, channel_axis=1), h])
            size = (size - 1) // stride + 1
        else:
            gamma, beta, mean, var = (
                p.astype(f64).reshape(1, -1, 1, 1) for p in artifact.bn_params(f"{name}.bn", bits)
            )
            denom = np.sqrt(var + f64(artifact.bn_eps))
            t = g.op("Div", [g.op("Sub", [x, g.const(mean)]), g.const(denom)])
            t = g.op("Relu", [g.op("Add", [g.op("Mul", [t, g.const(gamma)]), g.const(beta)])])
            t = g.op("ReduceMean", [t], axes=[2, 3], keepdims=0)
            fc_w = np.ascontiguousarray(artifact.tensors[f"{name}.fc.weight"].astype(f64).T)
            t = g.op(
                "Add", [g.op("MatMul", [t, g.const(fc_w)]), g.const(artifact.tensors[f"{name}.fc.bias"].astype(f64))]
            )
            x = g.op("Cast", [t], to=TensorProto.FLOAT)
    inp = helper.make_tensor_value_info("image", TensorProto.DOUBLE, ["batch", 28, 28, 1])
    return g.model(inp, x, TensorProto.FLOAT, ["batch", artifact.architecture[-1]["out"]])
