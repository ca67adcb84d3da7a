"""The engine the server calls: ``run(batch, bits) -> logits``.

One copy of the packed weights (the loaded artifact: the native kernels read its bit-planes in place);
per-bits execution state (a native network description or an onnxruntime session) is built lazily on
first use and cached. The backend per bits comes from a profile (kernels.profiler) or the defaults:

- 32: onnxruntime fp32 graph
- 1, and 2 on a CPU with AVX-512 VPOPCNTDQ: the native bit-serial kernels (AND + popcount on the top-k
  bit-planes)
- 3..8 on a CPU with AVX-512 VNNI (and 2 without VPOPCNTDQ): the native integer kernels at width 8
  (uint8 codes x int8 levels)
- otherwise 7, 8: the native integer kernels at width 16 (int16 codes x int16 weight levels -> int32,
  exact), 2..6: width 8 (AVX2: exact int16 partial sums)

These are the full profiles' choices on both instruction sets (docs/PERFORMANCE.md). A backend naming a
dispatch path this CPU lacks (a profile made on another machine) gets this CPU's default for its bits.

Other backends a profile may pick: onnxruntime int8 (MatMulInteger on the codes) and fp32-codes graphs for
any 1..8, the bit-serial kernels at any 1..8, width 8 at any 1..8 (1..7 on AVX2), width 16 at any 1..8,
and each native dispatch path by name (``native-avx512``, ``int16-scalar``, ``int8-avx2``).

Every backend computes in float64 outside the integer convs, like the reference engine, so the codes it
quantizes are the reference's. One batch runs at a time per engine, on ``threads`` cores: concurrent
callers queue on a lock instead of oversubscribing the cores. The GIL is released during compute
(onnxruntime and ctypes both release it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import numpy as np

from kernels.reference import ReferenceEngine
from model_store.artifact import Artifact

FP32 = 32
ORT_FP32 = "onnxruntime-fp32"
ORT_INT8 = "onnxruntime-int8"
ORT_FP32_CODES = "onnxruntime-fp32-codes"
REFERENCE = "reference"
NATIVE_PREFIX = "native"  # the bit-serial kernels: native, native-avx2, native-scalar, ...
INT16_PREFIX = "int16"  # the integer kernels at width 16: int16, int16-avx2, int16-scalar
INT8_PREFIX = "int8"  # the integer kernels at width 8: int8, int8-avx2, int8-scalar (bits <= 7)
INTEGER_WIDTH = {INT8_PREFIX: 8, INT16_PREFIX: 16}

Runner = Callable[[np.ndarray], np.ndarray]
Backends = Mapping[int, str] | Mapping[str, str]  # bits (or its string, as in a profile file) -> backend


def default_backend(bits: int) -> str:
    if bits == FP32:
        return ORT_FP32
    if bits == 1 or (bits == 2 and "avx512" in _native_paths()):
        return NATIVE_PREFIX
    if bits <= 6 or "avx512" in _integer_paths():
        return INT8_PREFIX
    return INT16_PREFIX


def _integer_paths() -> list[str]:
    from kernels import clib

    return clib.available_paths()


def _native_paths() -> list[str]:
    from kernels import bitserial

    return bitserial.available_paths()


def backends_for(bits: int) -> list[str]:
    """Every backend that can serve ``bits`` on this machine (native: each dispatch path the CPU runs)."""
    if bits == FP32:
        return [ORT_FP32]
    native = [f"{NATIVE_PREFIX}-{p}" for p in _native_paths()]
    wide = [f"{prefix}-{p}" for prefix in _integer_prefixes(bits) for p in _integer_paths() if _serves(prefix, p, bits)]
    return ([ORT_INT8] if bits >= 3 else []) + [ORT_FP32_CODES] + wide + native


def _integer_prefixes(bits: int) -> list[str]:
    """The integer kernel widths that serve ``bits`` on some path."""
    return [prefix for prefix in INTEGER_WIDTH if _serves(prefix, "scalar", bits)]


def _serves(prefix: str, path: str, bits: int) -> bool:
    from kernels import integer

    return 1 <= bits <= integer.max_bits(INTEGER_WIDTH[prefix], path)


def check_backend(bits: int, name: str) -> None:
    """Raise ValueError unless ``name`` is a backend that can serve ``bits`` (on some CPU: a native path
    this CPU lacks falls back to the best one it has)."""
    if name == REFERENCE:
        return
    if bits == FP32:
        ok = name == ORT_FP32
    elif name == NATIVE_PREFIX or name.startswith(f"{NATIVE_PREFIX}-"):
        ok = 1 <= bits <= 8
    elif name.split("-")[0] in INTEGER_WIDTH:
        from kernels import integer

        prefix, _, path = name.partition("-")
        ok = _serves(prefix, path, bits) if path in integer.PATHS else prefix in _integer_prefixes(bits)
    else:
        ok = name == ORT_FP32_CODES or (name == ORT_INT8 and bits >= 3)
    if not ok:
        raise ValueError(f"backend {name!r} cannot serve bits {bits}; this CPU has {', '.join(backends_for(bits))}")


def as_images(batch: np.ndarray) -> np.ndarray:
    """Validate a batch: uint8 pixels 0..255 or float in [0, 1], [B, 1, 28, 28], [B, 28, 28] or [B, 784]."""
    x = np.asarray(batch)
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise ValueError(f"images must be uint8 pixels or floats in [0, 1], not {x.dtype}")
    if x.ndim < 1 or (x.size and x.size != x.shape[0] * 784) or (x.ndim > 1 and int(np.prod(x.shape[1:])) != 784):
        raise ValueError(f"images must be [B, 1, 28, 28], [B, 28, 28] or [B, 784], got shape {list(x.shape)}")
    if x.dtype.kind == "f" and x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
        raise ValueError("float images must be finite and in [0, 1]")
    return x.reshape(x.shape[0], 784)


def _float64_nhwc(x: np.ndarray) -> np.ndarray:
    """The reference's input conversion, in float64: pixels * (1 / 255)."""
    if x.dtype == np.uint8:
        return (x.astype(np.float64) * np.float64(1.0 / 255.0)).reshape(-1, 28, 28, 1)
    return x.astype(np.float64).reshape(-1, 28, 28, 1)


class Engine:
    def __init__(self, artifact: Artifact, threads: int = 1, backends: Backends | None = None):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        self.artifact = artifact
        self.threads = threads
        self._chosen = {b: default_backend(b) for b in artifact.bits}
        for key, name in (backends or {}).items():
            bits = int(key)
            if bits not in self._chosen:
                raise ValueError(f"backend given for bits {bits}, which the model does not serve")
            check_backend(bits, name)
            self._chosen[bits] = name
        self._runners: dict[int, tuple[str, Runner]] = {}
        self._build_lock = threading.Lock()
        self._compute_lock = threading.Lock()

    @property
    def bits(self) -> tuple[int, ...]:
        return self.artifact.bits

    def backend(self, bits: int) -> str:
        """The backend serving ``bits`` (native names carry the dispatch path, e.g. native-avx2)."""
        return self._runner(bits)[0]

    def warm(self, bits: int) -> None:
        """Build the execution state for ``bits`` now rather than at its first batch."""
        self._runner(bits)

    def run(self, batch: np.ndarray, bits: int) -> np.ndarray:
        _, runner = self._runner(bits)
        images = as_images(batch)
        if images.shape[0] == 0:
            return np.zeros((0, self.artifact.architecture[-1]["out"]), dtype=np.float32)
        with self._compute_lock:
            return runner(images)

    def _runner(self, bits: int) -> tuple[str, Runner]:
        if bits not in self._chosen:
            raise ValueError(f"bits {bits} not servable; choose one of {self.bits}")
        runner = self._runners.get(bits)
        if runner is None:
            with self._build_lock:
                runner = self._runners.get(bits)
                if runner is None:
                    runner = self._runners[bits] = build_runner(self.artifact, bits, self._chosen[bits], self.threads)
        return runner


def build_runner(artifact: Artifact, bits: int, backend: str, threads: int) -> tuple[str, Runner]:
    """(resolved backend name, images [B, 784] -> float32 logits) for one bits."""
    if backend == REFERENCE:
        ref = ReferenceEngine(artifact)
        return REFERENCE, lambda x: ref.run(x.reshape(-1, 1, 28, 28), bits)
    prefix = backend.split("-")[0]
    if prefix in INTEGER_WIDTH:
        from kernels import integer

        path = backend[len(prefix) + 1 :] or "auto"
        if path == "auto":
            path = _integer_paths()[0]
        elif path not in _integer_paths():
            return build_runner(artifact, bits, default_backend(bits), threads)
        if not _serves(prefix, path, bits):
            prefix = INT16_PREFIX  # width 8 at 8 bits where only VNNI makes it exact
        wide = integer.IntegerNet(artifact, bits, INTEGER_WIDTH[prefix], path)
        return f"{prefix}-{wide.path}", lambda x: wide.run(_float64_nhwc(x), threads)
    if backend.startswith(NATIVE_PREFIX):
        from kernels import bitserial

        path = backend[len(NATIVE_PREFIX) + 1 :] or "auto"
        if path != "auto" and path not in _native_paths():
            return build_runner(artifact, bits, default_backend(bits), threads)
        net = bitserial.BitSerialNet(artifact, bits, path)
        return f"{NATIVE_PREFIX}-{net.path}", lambda x: net.run(_float64_nhwc(x), threads)
    if backend == ORT_FP32:
        if bits != FP32:
            raise ValueError(f"{ORT_FP32} serves bits 32 only, not {bits}")
        from kernels import onnx_graphs

        session = _session(onnx_graphs.fp32_graph(artifact).SerializeToString(), threads)

        def run_fp32(x: np.ndarray) -> np.ndarray:
            xf = x.astype(np.float32) * np.float32(1.0 / 255.0) if x.dtype == np.uint8 else x.astype(np.float32)
            return session.run(None, {"image": xf.reshape(-1, 1, 28, 28)})[0]

        return ORT_FP32, run_fp32
    if backend == ORT_INT8:
        from kernels import onnx_graphs

        session = _session(onnx_graphs.int8_graph(artifact, bits).SerializeToString(), threads)
        return ORT_INT8, lambda x: session.run(None, {"image": _float64_nhwc(x)})[0]
    if backend == ORT_FP32_CODES:
        from kernels import onnx_graphs

        session = _session(onnx_graphs.fp32_codes_graph(artifact, bits).SerializeToString(), threads)
        return ORT_FP32_CODES, lambda x: session.run(None, {"image": _float64_nhwc(x)})[0]
    raise ValueError(f"unknown backend {backend!r} for bits {bits}")


def _session(model: bytes, threads: int):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No per-session arena: with one session per bits, each arena would keep its own peak of
    # intermediates (tens of MB at batch 64) for good; freed buffers go back to malloc instead.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    # no busy-waiting between batches: the server's event loop shares these cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
