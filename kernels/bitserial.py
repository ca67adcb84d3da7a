"""The native bit-serial kernels (kernels/native/bitserial.c), loaded with ctypes.

ctypes releases the GIL for the whole call, so engine threads run in parallel with the event loop.
The weights are the artifact's bit-planes themselves: the C code reads the top k planes in place.
Everything else a bits needs (BN parameters, scales as float64) is a few KB, built once per bits.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path
from typing import Any

import numpy as np

from model_store.artifact import Artifact

PATHS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
_NAMES = {v: k for k, v in PATHS.items()}


class NativeError(RuntimeError):
    """The native kernels are missing or refused the call."""


def _find_library() -> Path:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_bitserial{suffix}"
        if candidate.exists():
            return candidate
    raise NativeError(
        f"native kernels not built (no {here}/_bitserial*.so): run `pip install -e .` with a C compiler available"
    )


_P = ctypes.POINTER


class _BatchNorm(ctypes.Structure):
    _fields_ = [
        ("mean", _P(ctypes.c_double)),
        ("denom", _P(ctypes.c_double)),
        ("gamma", _P(ctypes.c_double)),
        ("beta", _P(ctypes.c_double)),
    ]


class _Block(ctypes.Structure):
    _fields_ = [
        ("cin", ctypes.c_int),
        ("cout", ctypes.c_int),
        ("stride", ctypes.c_int),
        ("rw1", ctypes.c_int),
        ("rw2", ctypes.c_int),
        ("w1", _P(ctypes.c_uint64)),
        ("w2", _P(ctypes.c_uint64)),
        ("xthr", _P(ctypes.c_double)),
        ("xthr_t", _P(ctypes.c_double)),
        ("xsign", _P(ctypes.c_int32)),
        ("ithr", _P(ctypes.c_int64)),
        ("ithr_t", _P(ctypes.c_int64)),
        ("isign", _P(ctypes.c_int32)),
        ("alpha2", _P(ctypes.c_double)),
    ]


class _Net(ctypes.Structure):
    _fields_ = [
        ("bits", ctypes.c_int),
        ("height", ctypes.c_int),
        ("width", ctypes.c_int),
        ("nblocks", ctypes.c_int),
        ("stem_cout", ctypes.c_int),
        ("stem_kernel", ctypes.c_int),
        ("stem_w", _P(ctypes.c_double)),
        ("blocks", _P(_Block)),
        ("head_in", ctypes.c_int),
        ("head_out", ctypes.c_int),
        ("head_bn", _BatchNorm),
        ("fc_w", _P(ctypes.c_double)),
        ("fc_b", _P(ctypes.c_double)),
    ]


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_find_library()))
    lib.apq_cpu_supports.argtypes = [ctypes.c_int]
    lib.apq_cpu_supports.restype = ctypes.c_int
    lib.apq_best_path.argtypes = []
    lib.apq_best_path.restype = ctypes.c_int
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
    lib.apq_int_thresholds.argtypes = [
        _P(_BatchNorm),
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.apq_int_thresholds.restype = None
    lib.apq_float_thresholds.argtypes = [_P(_BatchNorm), ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.apq_float_thresholds.restype = None
    return lib


_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def available_paths() -> list[str]:
    """The dispatch paths this CPU runs, fastest first."""
    lib = library()
    return [name for name in ("avx512", "avx2", "scalar") if lib.apq_cpu_supports(PATHS[name])]


def best_path() -> str:
    return _NAMES[library().apq_best_path()]


def _path_code(path: str) -> int:
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r}; choose one of {sorted(PATHS)}")
    code = PATHS[path]
    if code and not library().apq_cpu_supports(code):
        raise NativeError(f"kernel path {path!r} is not supported by this CPU (available: {available_paths()})")
    return code


def _ptr(arr: np.ndarray, ctype: Any) -> Any:
    return arr.ctypes.data_as(_P(ctype))


def _words(planes: np.ndarray) -> np.ndarray:
    """uint8 planes [8, cout, row_bytes] as uint64 words, in place when the buffer is 8-byte aligned."""
    if planes.ctypes.data % 8:
        planes = np.ascontiguousarray(planes).copy()
    return planes.view(np.uint64)


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
    rc = library().apq_conv_codes(
        codes.ctypes.data, b, h, w, cin, bits, words.ctypes.data, cout, rw, stride, out.ctypes.data, _path_code(path)
    )
    if rc:
        raise NativeError(f"apq_conv_codes failed ({rc})")
    return out


def _bn(artifact: Artifact, name: str, bits: int, keep: list[np.ndarray]) -> _BatchNorm:
    gamma, beta, mean, var = (np.ascontiguousarray(p, dtype=np.float64) for p in artifact.bn_params(name, bits))
    denom = np.sqrt(var + np.float64(artifact.bn_eps))
    keep += [mean, denom, gamma, beta]
    return _BatchNorm(*(_ptr(a, ctypes.c_double) for a in (mean, denom, gamma, beta)))


class BitSerialNet:
    """The whole network at ``bits`` on the native kernels: ``run(images float64 [B, 28, 28]) -> logits``."""

    def __init__(self, artifact: Artifact, bits: int, path: str = "auto"):
        if not 1 <= bits <= 8:
            raise ValueError(f"the bit-serial kernels serve 1..8 bits, not {bits}")
        self.bits = bits
        self.path = best_path() if path == "auto" else path
        self._path = _path_code(self.path)
        keep: list[np.ndarray] = []  # every array the C structs point into
        layers = artifact.architecture
        stem, head, blocks = layers[0], layers[-1], layers[1:-1]
        t = artifact.tensors
        sw = t[f"{stem['name']}.weight"]
        if sw.shape[1] != 1:
            raise ValueError("the native stem takes one input channel")
        stem_w = np.ascontiguousarray(sw.reshape(sw.shape[0], -1).T, dtype=np.float64)  # [kk*kk, cout]
        keep.append(stem_w)
        lib, n = library(), (1 << bits) - 1
        cblocks = (_Block * len(blocks))()
        for i, layer in enumerate(blocks):
            name, cin, cout = layer["name"], layer["in"], layer["out"]
            w1, w2 = _words(t[f"{name}.conv1.planes"]), _words(t[f"{name}.conv2.planes"])
            # bn1 + quantizer on the float residual stream, as thresholds on float64 values
            xthr, xsign = np.empty((cin, n), np.float64), np.empty(cin, np.int32)
            lib.apq_float_thresholds(
                ctypes.byref(_bn(artifact, f"{name}.bn1", bits, keep)), cin, bits, xthr.ctypes.data, xsign.ctypes.data
            )
            # conv1's integer outputs I -> y = I * scale / (N n) -> bn2 + quantizer, as integer thresholds
            alpha1 = t[f"{name}.conv1.scales"][bits - 1].astype(np.float64) / float((n + 1) * n)
            ithr, isign = np.empty((cout, n), np.int64), np.empty(cout, np.int32)
            imax = 9 * cin * n * n
            lib.apq_int_thresholds(
                ctypes.byref(_bn(artifact, f"{name}.bn2", bits, keep)),
                alpha1.ctypes.data,
                cout,
                bits,
                imax,
                ithr.ctypes.data,
                isign.ctypes.data,
            )
            alpha2 = t[f"{name}.conv2.scales"][bits - 1].astype(np.float64) / float((n + 1) * n)
            xthr_t, ithr_t = np.ascontiguousarray(xthr.T), np.ascontiguousarray(ithr.T)  # SIMD layouts
            keep += [w1, w2, xthr, xthr_t, xsign, ithr, ithr_t, isign, alpha1, alpha2]
            cblocks[i] = _Block(
                cin, cout, layer["stride"], w1.shape[2], w2.shape[2],
                _ptr(w1, ctypes.c_uint64), _ptr(w2, ctypes.c_uint64),
                _ptr(xthr, ctypes.c_double), _ptr(xthr_t, ctypes.c_double), _ptr(xsign, ctypes.c_int32),
                _ptr(ithr, ctypes.c_int64), _ptr(ithr_t, ctypes.c_int64), _ptr(isign, ctypes.c_int32),
                _ptr(alpha2, ctypes.c_double),
            )  # fmt: skip
        fc_w = np.ascontiguousarray(t[f"{head['name']}.fc.weight"], dtype=np.float64)
        fc_b = np.ascontiguousarray(t[f"{head['name']}.fc.bias"], dtype=np.float64)
        keep += [fc_w, fc_b]
        self._net = _Net(
            bits, 28, 28, len(blocks), stem["out"], stem["kernel"], _ptr(stem_w, ctypes.c_double), cblocks,
            head["in"], head["out"], _bn(artifact, f"{head['name']}.bn", bits, keep),
            _ptr(fc_w, ctypes.c_double), _ptr(fc_b, ctypes.c_double),
        )  # fmt: skip
        self._blocks = cblocks
        self._keep = keep
        self.outputs = head["out"]

    def run(self, images: np.ndarray, threads: int = 1) -> np.ndarray:
        """images: float64 [B, 28, 28] (pixels / 255) -> float32 logits [B, outputs]."""
        x = np.ascontiguousarray(images, dtype=np.float64).reshape(-1, 28, 28)
        logits = np.empty((x.shape[0], self.outputs), dtype=np.float32)
        rc = library().apq_forward(
            ctypes.byref(self._net), x.ctypes.data, x.shape[0], logits.ctypes.data, max(1, threads), self._path
        )
        if rc:
            raise NativeError(f"apq_forward failed ({rc})")
        return logits
