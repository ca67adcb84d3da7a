"""The native bit-serial kernels (kernels/native/bitserial.c): AND + popcount on the top-k bit-planes.

The weights are the artifact's bit-planes themselves: the C code reads the top k planes in place.
Everything else a bits needs (BN parameters and thresholds, scales as float64) is a few KB, built once
per bits.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from kernels import clib
from kernels.clib import NativeError, available_paths, best_path
from model_store.artifact import Artifact

__all__ = ["BitSerialNet", "NativeError", "available_paths", "best_path", "conv_codes", "stem"]

_P = clib.P


class _Block(ctypes.Structure):
    _fields_ = [
        ("cin", ctypes.c_int),
        ("cout", ctypes.c_int),
        ("stride", ctypes.c_int),
        ("rw1", ctypes.c_int),
        ("rw2", ctypes.c_int),
        ("w1", _P(ctypes.c_uint64)),
        ("w2", _P(ctypes.c_uint64)),
        ("w1n", _P(ctypes.c_uint64)),
        ("w2n", _P(ctypes.c_uint64)),
        ("xthr", _P(ctypes.c_double)),
        ("xthr_t", _P(ctypes.c_double)),
        ("xsign", _P(ctypes.c_int32)),
        ("xneg", _P(ctypes.c_double)),
        ("ithr", _P(ctypes.c_int64)),
        ("isign", _P(ctypes.c_int32)),
        ("icmp_t", _P(ctypes.c_int64)),
        ("iflip", _P(ctypes.c_uint8)),
        ("alpha2", _P(ctypes.c_double)),
    ]


_Net = clib.net_struct(_Block)


@functools.cache
def _library() -> ctypes.CDLL:
    """The library with this module's entry points typed (once)."""
    lib = clib.library()
    lib.apq_forward.argtypes = [_P(_Net), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.apq_forward.restype = ctypes.c_int
    lib.apq_conv_codes.argtypes = (
        [ctypes.c_void_p]
        + [ctypes.c_int] * 5
        + [ctypes.c_void_p]
        + [ctypes.c_int] * 3
        + [ctypes.c_void_p, ctypes.c_int]
    )
    lib.apq_conv_codes.restype = ctypes.c_int
    lib.apq_split_nibbles.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.apq_split_nibbles.restype = None
    i, p = ctypes.c_int, ctypes.c_void_p
    lib.apq_stem.argtypes = [i, p, i, i, i, p, i, p]  # path, image, H, W, kernel, weights, cout, out
    lib.apq_stem.restype = None
    return lib


def _words(planes: np.ndarray) -> np.ndarray:
    """uint8 planes [8, cout, row_bytes] as uint64 words, in place when the buffer is 8-byte aligned."""
    if planes.ctypes.data % 8:
        planes = np.ascontiguousarray(planes).copy()
    return planes.view(np.uint64)


def _nibbles(words: np.ndarray, bits: int) -> np.ndarray:
    """The AVX2 core's copy of the top ``bits`` planes, split into nibbles: [2, bits, cout, rw] uint64."""
    top = np.ascontiguousarray(words[:bits])
    out = clib.aligned_empty((2, *top.shape), np.uint64)
    _library().apq_split_nibbles(top.ctypes.data, bits, top.shape[1], top.shape[2], out.ctypes.data)
    return out


def _signed_thresholds(thr: np.ndarray, sign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The SIMD packing epilogues' thresholds, sign folded in (see epilogue_pack_avx512_k): for a
    channel of sign -1 the code is n - #{j : I >= 1 - T_(n+1-j)}, the complement of its planes.
    Returns cmp_t [n, cout] int64 and flip [64 * words] uint8 (0xFF where the sign is -1)."""
    neg = sign < 0
    cmp = np.where(neg[:, None], 1 - thr[:, ::-1], thr)
    flip = np.zeros(-(-len(sign) // 64) * 64, dtype=np.uint8)
    flip[: len(sign)][neg] = 0xFF
    return np.ascontiguousarray(cmp.T, dtype=np.int64), flip


def conv_codes(codes: np.ndarray, planes: np.ndarray, bits: int, stride: int, path: str = "auto") -> np.ndarray:
    """Integer outputs I = sum_j (2 c_j + 1 - 2^k) a_j of a 3x3 conv (pad 1) on k-bit activation codes
    [B, H, W, cin] (uint8) with artifact-layout planes [8, cout, row_bytes]: int64 [B, Ho, Wo, cout]."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    b, h, w, cin = codes.shape
    words = _words(planes)
    cout, rw = words.shape[1], words.shape[2]
    if rw * 64 < 9 * cin:
        raise ValueError(f"planes hold {rw * 64} bits per row, a 3x3 conv on {cin} channels needs {9 * cin}")
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    out = np.empty((b, ho, wo, cout), dtype=np.int64)
    rc = _library().apq_conv_codes(
        codes.ctypes.data, b, h, w, cin, bits, words.ctypes.data, cout, rw, stride, out.ctypes.data,
        clib.path_code(path),
    )  # fmt: skip
    if rc:
        raise NativeError(f"apq_conv_codes failed ({rc})")
    return out


def stem(image: np.ndarray, weights: np.ndarray, path: str = "auto") -> np.ndarray:
    """The forward pass's float64 stem: a conv of one channel ``image`` [H, W], zero padding kernel // 2,
    with ``weights`` [kernel * kernel, cout] (taps in (ky, kx) order): [H, W, cout]."""
    image = np.ascontiguousarray(image, dtype=np.float64)
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    (h, w), (taps, cout) = image.shape, weights.shape
    kernel = round(taps**0.5)
    if kernel * kernel != taps:
        raise ValueError(f"weights must have kernel * kernel rows, got {taps}")
    out = np.empty((h, w, cout), dtype=np.float64)
    code = clib.path_code(best_path() if path == "auto" else path)
    _library().apq_stem(code, image.ctypes.data, h, w, kernel, weights.ctypes.data, cout, out.ctypes.data)
    return out


class BitSerialNet:
    """The whole network at ``bits`` on the native kernels: ``run(images float64 [B, 28, 28]) -> logits``."""

    def __init__(self, artifact: Artifact, bits: int, path: str = "auto"):
        if not 1 <= bits <= 8:
            raise ValueError(f"the bit-serial kernels serve 1..8 bits, not {bits}")
        self.bits = bits
        self.path = best_path() if path == "auto" else path
        self._path = clib.path_code(self.path)
        keep: list[np.ndarray] = []  # every array the C structs point into
        parts = clib.FloatParts(artifact, bits, keep)
        t = artifact.tensors
        n = (1 << bits) - 1
        cblocks = (_Block * len(parts.blocks))()
        for i, layer in enumerate(parts.blocks):
            name, cin, cout = layer["name"], layer["in"], layer["out"]
            w1, w2 = _words(t[f"{name}.conv1.planes"]), _words(t[f"{name}.conv2.planes"])
            w1n, w2n = _nibbles(w1, bits), _nibbles(w2, bits)
            # bn1 + quantizer on the float residual stream, as thresholds on float64 values
            xthr, xsign = clib.float_thresholds(clib.batchnorm(artifact, f"{name}.bn1", bits, keep), cin, bits)
            # conv1's integer outputs I -> y = I * scale / (N n) -> bn2 + quantizer, as integer thresholds
            alpha1 = clib.alpha(artifact, f"{name}.conv1", bits)
            bn2 = clib.batchnorm(artifact, f"{name}.bn2", bits, keep)
            ithr, isign = clib.int_thresholds(bn2, alpha1, cout, bits, 9 * cin * n * n)
            alpha2 = clib.alpha(artifact, f"{name}.conv2", bits)
            xthr_t = np.ascontiguousarray(xthr.T)  # the SIMD layout
            xneg = np.where(xsign < 0, -0.0, 0.0)  # the sign as a sign bit to XOR (SIMD)
            icmp_t, iflip = _signed_thresholds(ithr, isign)  # the SIMD packing epilogues'
            keep += [w1, w2, w1n, w2n, xthr, xthr_t, xsign, xneg, ithr, isign, icmp_t, iflip, alpha1, alpha2]
            ptr = clib.ptr
            cblocks[i] = _Block(
                cin, cout, layer["stride"], w1.shape[2], w2.shape[2],
                ptr(w1, ctypes.c_uint64), ptr(w2, ctypes.c_uint64), ptr(w1n, ctypes.c_uint64), ptr(w2n, ctypes.c_uint64),
                ptr(xthr, ctypes.c_double), ptr(xthr_t, ctypes.c_double), ptr(xsign, ctypes.c_int32),
                ptr(xneg, ctypes.c_double),
                ptr(ithr, ctypes.c_int64), ptr(isign, ctypes.c_int32),
                ptr(icmp_t, ctypes.c_int64), ptr(iflip, ctypes.c_uint8),
                ptr(alpha2, ctypes.c_double),
            )  # fmt: skip
        self._net = parts.net(_Net, cblocks)
        self._blocks = cblocks
        self._keep = keep
        self.outputs = parts.head["out"]

    def run(self, images: np.ndarray, threads: int = 1) -> np.ndarray:
        """images: float64 [B, 28, 28] (pixels / 255) -> float32 logits [B, outputs]."""
        return clib.forward(_library().apq_forward, self._net, images, self.outputs, threads, self._path)
