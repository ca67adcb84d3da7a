"""The native library (kernels/native: bitserial.c and integer.c in one shared object), loaded with ctypes.

ctypes releases the GIL for the whole of every call, so engine threads run in parallel with the event
loop. This module holds what both kernel families share: loading, the dispatch paths, and the float64
parts of the network (stem, BatchNorm, head) as the C structs want them.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path
from typing import Any

import numpy as np

from model_store.artifact import Artifact

PATHS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
NAMES = {v: k for k, v in PATHS.items()}
P = ctypes.POINTER
LIBRARY_ENV = "APSERVE_NATIVE_LIBRARY"  # another build of the library to load instead of the installed one


class NativeError(RuntimeError):
    """The native kernels are missing or refused the call."""


def _find_library() -> Path:
    override = os.environ.get(LIBRARY_ENV)
    if override:  # e.g. the AVX-512 emulation build (tests/test_kernels_avx512_emulated.py)
        return Path(override)
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_bitserial{suffix}"
        if candidate.exists():
            return candidate
    raise NativeError(
        f"native kernels not built (no {here}/_bitserial*.so): run `pip install -e .` with a C compiler available"
    )


_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(str(_find_library()))
        lib.apq_cpu_supports.argtypes = [ctypes.c_int]
        lib.apq_cpu_supports.restype = ctypes.c_int
        lib.apq_best_path.argtypes = []
        lib.apq_best_path.restype = ctypes.c_int
        bn, vp, i = P(BatchNorm), ctypes.c_void_p, ctypes.c_int
        lib.apq_int_thresholds.argtypes = [bn, vp, i, i, ctypes.c_int64, vp, vp]
        lib.apq_int_thresholds.restype = None
        lib.apq_float_thresholds.argtypes = [bn, i, i, vp, vp]
        lib.apq_float_thresholds.restype = None
        _lib = lib
    return _lib


def available_paths() -> list[str]:
    """The dispatch paths this CPU runs, fastest first."""
    lib = library()
    return [name for name in ("avx512", "avx2", "scalar") if lib.apq_cpu_supports(PATHS[name])]


def best_path() -> str:
    return NAMES[library().apq_best_path()]


def path_code(path: str) -> int:
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r}; choose one of {sorted(PATHS)}")
    code = PATHS[path]
    if code and not library().apq_cpu_supports(code):
        raise NativeError(f"kernel path {path!r} is not supported by this CPU (available: {available_paths()})")
    return code


def aligned_empty(shape: tuple[int, ...], dtype: Any, alignment: int = 64) -> np.ndarray:
    """An uninitialised array starting on a cache line (numpy's own buffers are only 16-byte aligned), for
    the weights the SIMD kernels stream with 32-byte loads."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(nbytes + alignment, np.uint8)
    start = -buf.ctypes.data % alignment
    return buf[start : start + nbytes].view(dtype).reshape(shape)


def aligned(arr: np.ndarray) -> np.ndarray:
    """``arr`` itself if it starts on a cache line, else a copy that does."""
    if arr.flags.c_contiguous and arr.ctypes.data % 64 == 0:
        return arr
    out = aligned_empty(arr.shape, arr.dtype)
    out[...] = arr
    return out


def ptr(arr: np.ndarray, ctype: Any) -> Any:
    return arr.ctypes.data_as(P(ctype))


class BatchNorm(ctypes.Structure):
    _fields_ = [
        ("mean", P(ctypes.c_double)),
        ("denom", P(ctypes.c_double)),
        ("gamma", P(ctypes.c_double)),
        ("beta", P(ctypes.c_double)),
    ]


def batchnorm(artifact: Artifact, name: str, bits: int, keep: list[np.ndarray]) -> BatchNorm:
    """BN ``name`` at ``bits`` in float64 (denom = sqrt(var + eps)); its arrays are appended to ``keep``."""
    gamma, beta, mean, var = (np.ascontiguousarray(p, dtype=np.float64) for p in artifact.bn_params(name, bits))
    denom = np.sqrt(var + np.float64(artifact.bn_eps))
    keep += [mean, denom, gamma, beta]
    return BatchNorm(*(ptr(a, ctypes.c_double) for a in (mean, denom, gamma, beta)))


def alpha(artifact: Artifact, conv: str, bits: int) -> np.ndarray:
    """float64 [cout]: the factor from a conv's integer I to its value, weight scale / (N n)."""
    n = (1 << bits) - 1
    return artifact.tensors[f"{conv}.scales"][bits - 1].astype(np.float64) / float((n + 1) * n)


def float_thresholds(bn: BatchNorm, channels: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm + quantizer on float64 values v as thresholds: code(v) = #{j : sign v >= thr[j]}, as
    (thr float64 [channels, n], sign int32 [channels]), found by bisection on the reference's expression."""
    n = (1 << bits) - 1
    thr, sign = np.empty((channels, n), np.float64), np.empty(channels, np.int32)
    library().apq_float_thresholds(ctypes.byref(bn), channels, bits, thr.ctypes.data, sign.ctypes.data)
    return thr, sign


def int_thresholds(
    bn: BatchNorm, alpha: np.ndarray, channels: int, bits: int, imax: int
) -> tuple[np.ndarray, np.ndarray]:
    """The same for a conv's integer outputs I in [-imax, imax], v = I * alpha: (thr int64 [channels, n],
    sign int32 [channels])."""
    n = (1 << bits) - 1
    thr, sign = np.empty((channels, n), np.int64), np.empty(channels, np.int32)
    library().apq_int_thresholds(
        ctypes.byref(bn), alpha.ctypes.data, channels, bits, imax, thr.ctypes.data, sign.ctypes.data
    )
    return thr, sign


def net_struct(block: type[ctypes.Structure]) -> type[ctypes.Structure]:
    """The C net struct (apq_net of bitserial.c, apq_net_int of integer.c): the float parts around an array of
    ``block``, the one field in which the two differ."""

    class Net(ctypes.Structure):
        _fields_ = [
            ("bits", ctypes.c_int),
            ("height", ctypes.c_int),
            ("width", ctypes.c_int),
            ("nblocks", ctypes.c_int),
            ("stem_cout", ctypes.c_int),
            ("stem_kernel", ctypes.c_int),
            ("stem_w", P(ctypes.c_double)),
            ("blocks", P(block)),
            ("head_in", ctypes.c_int),
            ("head_out", ctypes.c_int),
            ("head_bn", BatchNorm),
            ("fc_w", P(ctypes.c_double)),
            ("fc_b", P(ctypes.c_double)),
        ]

    return Net


class FloatParts:
    """The stem and head of the network in float64, as the C net structs take them."""

    def __init__(self, artifact: Artifact, bits: int, keep: list[np.ndarray]):
        layers = artifact.architecture
        self.stem, self.head, self.blocks = layers[0], layers[-1], layers[1:-1]
        t = artifact.tensors
        sw = t[f"{self.stem['name']}.weight"]
        if sw.shape[1] != 1:
            raise ValueError("the native stem takes one input channel")
        stem_w = np.ascontiguousarray(sw.reshape(sw.shape[0], -1).T, dtype=np.float64)  # [kk*kk, cout]
        fc_w = np.ascontiguousarray(t[f"{self.head['name']}.fc.weight"], dtype=np.float64)
        fc_b = np.ascontiguousarray(t[f"{self.head['name']}.fc.bias"], dtype=np.float64)
        keep += [stem_w, fc_w, fc_b]
        self.stem_w, self.fc_w, self.fc_b = (ptr(a, ctypes.c_double) for a in (stem_w, fc_w, fc_b))
        self.head_bn = batchnorm(artifact, f"{self.head['name']}.bn", bits, keep)
        self.bits = bits

    def net(self, struct: type[ctypes.Structure], blocks: Any) -> ctypes.Structure:
        """An instance of ``struct`` (from ``net_struct``) for a 28 x 28 input around the C array ``blocks``."""
        stem, head = self.stem, self.head
        return struct(
            self.bits, 28, 28, len(self.blocks), stem["out"], stem["kernel"], self.stem_w, blocks,
            head["in"], head["out"], self.head_bn, self.fc_w, self.fc_b,
        )  # fmt: skip


def forward(fn: Any, net: Any, images: np.ndarray, outputs: int, threads: int, path: int, *extra: int) -> np.ndarray:
    """Run a C forward entry (``extra``: its arguments after the path): images float64 [B, 28, 28]
    (pixels / 255) -> float32 logits [B, outputs]."""
    x = np.ascontiguousarray(images, dtype=np.float64).reshape(-1, 28, 28)
    logits = np.empty((x.shape[0], outputs), dtype=np.float32)
    rc = fn(ctypes.byref(net), x.ctypes.data, x.shape[0], logits.ctypes.data, max(1, threads), path, *extra)
    if rc:
        raise NativeError(f"{fn.__name__} failed ({rc})")
    return logits
