"""The native int16 kernels (kernels/native/int16.c): 3..8 bits as int16 x int16 -> int32 dot products.

Each conv's weights are its k-bit levels 2c + 1 - 2^k as int16, packed once per bits for the AVX2 core
(``pack_levels``): about 1.4 MB per bits for the bundled model, beside the artifact's planes. The
requantizer between layers is the reference's float64 expression, so the codes, and the logits, are the
bit-serial kernels' (tests/test_kernels_native.py).
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from kernels import clib
from kernels.clib import NativeError, best_path
from model_store.artifact import Artifact, unpack_codes

COLS = 16  # output channels per micro-tile (int16.c)
_P = clib.P


class _Block(ctypes.Structure):
    _fields_ = [
        ("cin", ctypes.c_int),
        ("cout", ctypes.c_int),
        ("stride", ctypes.c_int),
        ("w1", _P(ctypes.c_int16)),
        ("w2", _P(ctypes.c_int16)),
        ("bn1", clib.BatchNorm),
        ("bn2", clib.BatchNorm),
        ("alpha1", _P(ctypes.c_double)),
        ("alpha2", _P(ctypes.c_double)),
    ]


_Net = clib.net_struct(_Block)


@functools.cache
def _library() -> ctypes.CDLL:
    """The library with this module's entry points typed (once)."""
    lib = clib.library()
    i, vp = ctypes.c_int, ctypes.c_void_p
    lib.apq_forward_int16.argtypes = [_P(_Net), vp, i, vp, i, i]
    lib.apq_forward_int16.restype = ctypes.c_int
    lib.apq_conv_int16.argtypes = [vp, i, i, i, i, vp, i, i, vp, i]
    lib.apq_conv_int16.restype = ctypes.c_int
    return lib


def pack_levels(planes: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """Artifact planes [8, cout, row_bytes] of a 3x3 conv with ``rows`` = 9 cin -> the k-bit levels
    2c + 1 - 2^k as int16 [cout / COLS, rows / 2, COLS, 2]: channel pairs of one output block side by side."""
    codes = unpack_codes(planes, bits, rows).astype(np.int16)  # [cout, rows]
    cout = codes.shape[0]
    if cout % COLS or rows % 2:
        raise ValueError(f"the int16 kernels need cout % {COLS} == 0 and an even 9 cin, not {cout} x {rows}")
    levels = 2 * codes + 1 - (1 << bits)
    return np.ascontiguousarray(levels.reshape(cout // COLS, COLS, rows // 2, 2).transpose(0, 2, 1, 3))


def conv_levels(codes: np.ndarray, packed: np.ndarray, stride: int, path: str = "auto") -> np.ndarray:
    """I = sum_j level_j a_j of a 3x3 conv (pad 1) on activation codes [B, H, W, cin] with packed levels
    (``pack_levels``): int32 [B, Ho, Wo, cout]."""
    codes = np.ascontiguousarray(codes, dtype=np.int16)
    b, h, w, cin = codes.shape
    cout = packed.shape[0] * COLS
    if packed.shape[1] * 2 != 9 * cin:
        raise ValueError(f"levels hold {packed.shape[1] * 2} rows, a 3x3 conv on {cin} channels needs {9 * cin}")
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    out = np.empty((b, ho, wo, cout), dtype=np.int32)
    lib = _library()
    rc = lib.apq_conv_int16(
        codes.ctypes.data, b, h, w, cin, packed.ctypes.data, cout, stride, out.ctypes.data, clib.path_code(path)
    )
    if rc:
        raise NativeError(f"apq_conv_int16 failed ({rc})")
    return out


class Int16Net:
    """The whole network at ``bits`` on the int16 kernels: ``run(images float64 [B, 28, 28]) -> logits``.
    ``path``: avx2 or scalar (auto: the best this CPU has; AVX-512 CPUs run the AVX2 code)."""

    def __init__(self, artifact: Artifact, bits: int, path: str = "auto"):
        if not 1 <= bits <= 8:
            raise ValueError(f"the int16 kernels serve 1..8 bits, not {bits}")
        self.bits = bits
        self.path = path if path != "auto" else ("scalar" if best_path() == "scalar" else "avx2")
        if self.path not in ("avx2", "scalar"):
            raise ValueError(f"the int16 kernels have avx2 and scalar paths, not {self.path!r}")
        self._path = clib.path_code(self.path)
        keep: list[np.ndarray] = []  # every array the C structs point into
        parts = clib.FloatParts(artifact, bits, keep)
        t = artifact.tensors
        cblocks = (_Block * len(parts.blocks))()
        for i, layer in enumerate(parts.blocks):
            name, cin, cout = layer["name"], layer["in"], layer["out"]
            w1 = pack_levels(t[f"{name}.conv1.planes"], bits, 9 * cin)
            w2 = pack_levels(t[f"{name}.conv2.planes"], bits, 9 * cout)
            alpha1, alpha2 = clib.alpha(artifact, f"{name}.conv1", bits), clib.alpha(artifact, f"{name}.conv2", bits)
            keep += [w1, w2, alpha1, alpha2]
            cblocks[i] = _Block(
                cin, cout, layer["stride"], clib.ptr(w1, ctypes.c_int16), clib.ptr(w2, ctypes.c_int16),
                clib.batchnorm(artifact, f"{name}.bn1", bits, keep), clib.batchnorm(artifact, f"{name}.bn2", bits, keep),
                clib.ptr(alpha1, ctypes.c_double), clib.ptr(alpha2, ctypes.c_double),
            )  # fmt: skip
        self._net = parts.net(_Net, cblocks)
        self._blocks = cblocks
        self._keep = keep
        self.outputs = parts.head["out"]

    def run(self, images: np.ndarray, threads: int = 1) -> np.ndarray:
        """images: float64 [B, 28, 28] (pixels / 255) -> float32 logits [B, outputs]."""
        return clib.forward(_library().apq_forward_int16, self._net, images, self.outputs, threads, self._path)
