"""The native integer kernels (kernels/native/integer.c): each conv as dot products of activation codes and
weights into int32, at width 16 (int16 codes x int16 levels: AVX2 vpmaddwd, AVX-512 VNNI vpdpwssd; any
bits) or width 8 (uint8 codes x int8 levels: AVX-512 VNNI vpdpbusd, any bits; AVX2 vpmaddubsw with int16
partial sums widened before they can overflow, bits <= 7).

Each conv's weights are its k-bit levels 2c + 1 - 2^k, packed once per bits for the SIMD cores
(``pack_levels``): about 1.4 MB (width 16) or 0.7 MB (width 8) per bits for the bundled model, beside the
artifact's planes. At 8 bits the levels reach +-255, so width 8 stores the half-levels c - 128 instead
(the level is twice that plus one; the kernel adds the window's activation sum back). The requantizer
between layers is the reference's float64 expression (or, up to 3 bits, a count of thresholds found on
it), so the codes, and the logits, are the bit-serial kernels' (tests/test_kernels_integer.py).
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from kernels import clib
from kernels.clib import NativeError, best_path
from model_store.artifact import Artifact, unpack_codes

COLS = 16  # output channels per micro-tile (integer.c)
WIDTHS = (8, 16)
_GROUP = {8: 4, 16: 2}  # input channels side by side in a packed weight group
_DTYPE = {8: np.int8, 16: np.int16}
_P = clib.P


# Up to this many bits the AVX2 requantizers count thresholds (at most 7 compares per value) instead of
# computing the float64 expression with its division.
THRESHOLD_MAX_BITS = 3


PATHS = ("avx512", "avx2", "scalar")


def resolve_path(path: str) -> str:
    """``auto`` -> the best path this CPU runs; a named path as it is."""
    if path == "auto":
        return best_path()
    if path not in PATHS:
        raise ValueError(f"the integer kernels have paths {', '.join(PATHS)}, not {path!r}")
    return path


def max_bits(width: int, path: str) -> int:
    """The most bits a width serves on a (resolved) path: AVX2's int16 pair sums of uint8 x int8 products
    saturate at 8 bits (integer.c explains), VNNI's int32 sums and the scalar code's do not."""
    return 7 if (width, path) == (8, "avx2") else 8


class _Block(ctypes.Structure):
    _fields_ = [
        ("cin", ctypes.c_int),
        ("cout", ctypes.c_int),
        ("stride", ctypes.c_int),
        ("w1", ctypes.c_void_p),
        ("w2", ctypes.c_void_p),
        ("bn1", clib.BatchNorm),
        ("bn2", clib.BatchNorm),
        ("alpha1", _P(ctypes.c_double)),
        ("alpha2", _P(ctypes.c_double)),
        ("xthr_t", _P(ctypes.c_double)),
        ("xsign", _P(ctypes.c_int32)),
        ("ithr_t", _P(ctypes.c_int32)),
        ("isign", _P(ctypes.c_int32)),
    ]


_Net = clib.net_struct(_Block)


@functools.cache
def _library() -> ctypes.CDLL:
    """The library with this module's entry points typed (once)."""
    lib = clib.library()
    i, vp = ctypes.c_int, ctypes.c_void_p
    lib.apq_forward_int.argtypes = [_P(_Net), vp, i, vp, i, i, i]
    lib.apq_forward_int.restype = ctypes.c_int
    lib.apq_conv_int.argtypes = [vp, i, i, i, i, vp, i, i, i, i, vp, i]
    lib.apq_conv_int.restype = ctypes.c_int
    return lib


def _check_width(width: int, bits: int, path: str = "scalar") -> None:
    if width not in WIDTHS:
        raise ValueError(f"the integer kernels have widths {WIDTHS}, not {width}")
    if not 1 <= bits <= max_bits(width, path):
        raise ValueError(f"width {width} on {path} serves 1..{max_bits(width, path)} bits, not {bits}")


def pack_levels(planes: np.ndarray, bits: int, rows: int, width: int = 16) -> np.ndarray:
    """Artifact planes [8, cout, row_bytes] of a 3x3 conv with ``rows`` = 9 cin -> [cout / COLS, rows / G,
    COLS, G], G input channels of one output block side by side: the k-bit levels 2c + 1 - 2^k as int16
    (G = 2, width 16) or int8 (G = 4, width 8; at 8 bits the half-levels c - 128)."""
    _check_width(width, bits)
    group = _GROUP[width]
    codes = unpack_codes(planes, bits, rows).astype(np.int16)  # [cout, rows]
    cout = codes.shape[0]
    if cout % COLS or rows % (9 * group):
        raise ValueError(
            f"width {width} needs cout % {COLS} == 0 and cin % {group} == 0, not {cout} x {rows // 9} (x 9 taps)"
        )
    weights = (codes - 128 if (width, bits) == (8, 8) else 2 * codes + 1 - (1 << bits)).astype(_DTYPE[width])
    return np.ascontiguousarray(weights.reshape(cout // COLS, COLS, rows // group, group).transpose(0, 2, 1, 3))


def conv_levels(codes: np.ndarray, packed: np.ndarray, bits: int, stride: int, path: str = "auto") -> np.ndarray:
    """I = sum_j level_j a_j of a 3x3 conv (pad 1) on k-bit activation codes [B, H, W, cin] with packed
    weights (``pack_levels``; the width follows their dtype): int32 [B, Ho, Wo, cout]."""
    width = 8 if packed.dtype == np.int8 else 16
    _check_width(width, bits, resolve_path(path))
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    b, h, w, cin = codes.shape
    cout = packed.shape[0] * COLS
    if packed.shape[1] * _GROUP[width] != 9 * cin:
        raise ValueError(
            f"levels hold {packed.shape[1] * _GROUP[width]} rows, a 3x3 conv on {cin} channels needs {9 * cin}"
        )
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    out = np.empty((b, ho, wo, cout), dtype=np.int32)
    rc = _library().apq_conv_int(
        codes.ctypes.data, b, h, w, cin, packed.ctypes.data, cout, stride, bits, width, out.ctypes.data,
        clib.path_code(path),
    )  # fmt: skip
    if rc:
        raise NativeError(f"apq_conv_int failed ({rc})")
    return out


def _set_thresholds(
    block: _Block, bn1: clib.BatchNorm, bn2: clib.BatchNorm, alpha1: np.ndarray, bits: int, keep: list[np.ndarray]
) -> None:
    """Point ``block`` at its requantizers as thresholds, in the SIMD layout [n, channels]."""
    n = (1 << bits) - 1
    xthr, xsign = clib.float_thresholds(bn1, block.cin, bits)
    ithr, isign = clib.int_thresholds(bn2, alpha1, block.cout, bits, 9 * block.cin * n * n)
    # code = #{j : sign I >= thr_j} = #{j : sign I > thr_j - 1}; every threshold lies in [-imax, imax + 1]
    ithr_t = np.ascontiguousarray(ithr.T - 1).astype(np.int32)
    xthr_t = np.ascontiguousarray(xthr.T)
    keep += [xthr_t, xsign, ithr_t, isign]
    block.xthr_t, block.xsign = clib.ptr(xthr_t, ctypes.c_double), clib.ptr(xsign, ctypes.c_int32)
    block.ithr_t, block.isign = clib.ptr(ithr_t, ctypes.c_int32), clib.ptr(isign, ctypes.c_int32)


class IntegerNet:
    """The whole network at ``bits`` on the integer kernels of ``width`` (8 or 16): ``run(images float64
    [B, 28, 28]) -> logits``. ``path``: avx512, avx2 or scalar (auto: the best this CPU has)."""

    def __init__(self, artifact: Artifact, bits: int, width: int = 16, path: str = "auto"):
        self.path = resolve_path(path)
        _check_width(width, bits, self.path)
        self.bits, self.width = bits, width
        self._path = clib.path_code(self.path)
        keep: list[np.ndarray] = []  # every array the C structs point into
        parts = clib.FloatParts(artifact, bits, keep)
        t = artifact.tensors
        cblocks = (_Block * len(parts.blocks))()
        for i, layer in enumerate(parts.blocks):
            name, cin, cout = layer["name"], layer["in"], layer["out"]
            w1 = clib.aligned(pack_levels(t[f"{name}.conv1.planes"], bits, 9 * cin, width))
            w2 = clib.aligned(pack_levels(t[f"{name}.conv2.planes"], bits, 9 * cout, width))
            alpha1, alpha2 = clib.alpha(artifact, f"{name}.conv1", bits), clib.alpha(artifact, f"{name}.conv2", bits)
            bn1 = clib.batchnorm(artifact, f"{name}.bn1", bits, keep)
            bn2 = clib.batchnorm(artifact, f"{name}.bn2", bits, keep)
            keep += [w1, w2, alpha1, alpha2]
            cblocks[i] = _Block(
                cin, cout, layer["stride"], w1.ctypes.data, w2.ctypes.data, bn1, bn2,
                clib.ptr(alpha1, ctypes.c_double), clib.ptr(alpha2, ctypes.c_double),
            )  # fmt: skip
            if bits <= THRESHOLD_MAX_BITS:
                _set_thresholds(cblocks[i], bn1, bn2, alpha1, bits, keep)
        self._net = parts.net(_Net, cblocks)
        self._blocks = cblocks
        self._keep = keep
        self.outputs = parts.head["out"]

    def run(self, images: np.ndarray, threads: int = 1) -> np.ndarray:
        """images: float64 [B, 28, 28] (pixels / 255) -> float32 logits [B, outputs]."""
        return clib.forward(
            _library().apq_forward_int, self._net, images, self.outputs, threads, self._path, self.width
        )
