"""`apserve profile`: latency per (bits, batch, backend) on this machine, each backend checked against
the reference engine, the fastest correct backend per bits, and the Pareto set of bits.

The profile file (format in docs/INTERNALS.md) is what the server and the simulator load at start.
``for_this_machine`` is the server's start: the saved profile when it was made on this hardware for this
model, else a quick profile of this machine (made once, then kept in a cache directory).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kernels import bitserial
from kernels.engine import (
    FP32,
    INT8_PREFIX,
    INT16_PREFIX,
    ORT_FP32,
    ORT_FP32_CODES,
    ORT_INT8,
    build_runner,
    default_backend,
)
from kernels.reference import ReferenceEngine
from model_store import fashion_mnist
from model_store.artifact import Artifact

BATCHES = (1, 2, 4, 8, 16, 32, 64)
CHECK_IMAGES = 1000
# Which native kernels are timed at which bits (measured: docs/PERFORMANCE.md, session 8). The bit-serial
# cost grows with k^2 plane pairs: past 2 bits it loses to the int8 kernels. The int8 kernels widen their
# int16 partial sums more often as k grows (every quad at 7 bits), so past 6 bits they lose to int16,
# which does twice their instructions per multiply-add and so is timed only from 5 bits. The portable C
# path is timed only where no SIMD path exists. With AVX-512 VNNI the int8 kernels are exact at every bits
# without widening and 1.5 x faster than int16 at 8 bits (session 14): they alone are timed from 2 bits.
NATIVE_MAX_BITS = 2
INT8_MAX_BITS = 6
INT16_MIN_BITS = 5
LOGIT_TOLERANCE = 1e-3  # relative to the largest reference logit
# The quick profile a server makes at start on new hardware: the default backend per bits (the choice the
# full profiles of both instruction sets made), checked on 64 images, each (bits, batch) timed for 3 calls
# and 100 ms: about 20 s on one core. The full profile (every candidate, 1,000 images, 300 ms) takes
# minutes: `apserve profile`.
QUICK_CHECK_IMAGES = 64
QUICK_MIN_MS = 100.0


def fingerprint(threads: int) -> dict[str, Any]:
    import onnxruntime

    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_vpopcntdq", "avx_vnni", "popcnt")
                flags = sorted(f for f in value.split() if f in wanted)
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "flags": flags,
        "cores": os.cpu_count(),
        "threads": threads,
        "onnxruntime": onnxruntime.__version__,
        "native_paths": bitserial.available_paths(),
    }


def model_sha256(artifact: Artifact) -> str:
    return str(artifact.manifest.get("payload_sha256") or hashlib.sha256(artifact.path.read_bytes()).hexdigest())


def candidates(bits: int) -> list[str]:
    if bits == FP32:
        return [ORT_FP32]
    paths = bitserial.available_paths()
    simd = [p for p in paths if p != "scalar"] or ["scalar"]
    native = [f"native-{p}" for p in simd] if bits <= NATIVE_MAX_BITS else []
    if "avx512" in paths:
        wide = [f"{INT8_PREFIX}-avx512"] if bits >= 2 else []
    else:
        integer_path = "avx2" if "avx2" in paths else "scalar"
        wide = [f"{INT8_PREFIX}-{integer_path}"] if bits <= INT8_MAX_BITS else []
        wide += [f"{INT16_PREFIX}-{integer_path}"] if bits >= INT16_MIN_BITS else []
    return ([ORT_INT8] if bits >= 3 else []) + [ORT_FP32_CODES] + wide + native


def time_interleaved(
    runs: dict[Any, Callable[[], Any]], min_runs: int = 3, max_runs: int = 50, min_ms: float = 300.0
) -> dict[Any, tuple[list[float], list[float]]]:
    """Wall and CPU milliseconds of every run, timed in rounds (one call of each per round, after one
    warm-up call each) until each has ``min_runs`` calls and ``min_ms`` of wall time or ``max_runs`` calls.
    On a machine whose speed swings for seconds at a time, this spreads each swing over every run instead
    of letting it land on whichever one was being timed: the ratios between runs are what a profile is for."""
    for run in runs.values():
        run()
    timed: dict[Any, tuple[list[float], list[float]]] = {key: ([], []) for key in runs}

    def wanted(key: Any) -> bool:
        walls = timed[key][0]
        return len(walls) < min_runs or (len(walls) < max_runs and sum(walls) < min_ms)

    while pending := [key for key in runs if wanted(key)]:
        for key in pending:
            w0, c0 = time.perf_counter(), time.process_time()
            runs[key]()
            timed[key][0].append(1000 * (time.perf_counter() - w0))
            timed[key][1].append(1000 * (time.process_time() - c0))
    return timed


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def accuracy_table(
    artifact: Artifact, images: np.ndarray, labels: np.ndarray, reference: ReferenceEngine
) -> dict[int, float]:
    """The artifact's validation accuracy per bits; measured on the check images where it has none."""
    for split in ("validation", "val", "test"):
        table = artifact.accuracy(split)
        if all(b in table for b in artifact.bits):
            return table
    return {b: float((reference.run(images, b).argmax(1) == labels).mean()) for b in artifact.bits}


def pareto(latency: dict[int, float], accuracy: dict[int, float]) -> list[int]:
    """Bits for which no other bits is both at least as fast and as accurate, and better in one."""
    keep = []
    for b in latency:
        dominated = any(
            latency[o] <= latency[b]
            and accuracy[o] >= accuracy[b]
            and (latency[o] < latency[b] or accuracy[o] > accuracy[b])
            for o in latency
            if o != b
        )
        if not dominated:
            keep.append(b)
    return sorted(keep)


def profile(
    artifact: Artifact,
    threads: int = 1,
    batches: Sequence[int] = BATCHES,
    bits_list: Sequence[int] | None = None,
    check_images: int = CHECK_IMAGES,
    progress: bool = True,
    defaults_only: bool = False,
    min_ms: float = 300.0,
) -> dict[str, Any]:
    """``defaults_only``: time only the engine's default backend per bits; ``min_ms``: wall time each
    (bits, batch, backend) is timed for, at least 3 calls."""
    bits_list = list(bits_list or artifact.bits)
    test = fashion_mnist.load("test")
    images, labels = test.images[:check_images][:, None], test.labels[:check_images]
    flat = images.reshape(len(images), 784)
    reference = ReferenceEngine(artifact)
    rng = np.random.default_rng(0)
    timing_images = test.images[rng.choice(len(test), size=max(batches), replace=False)].reshape(-1, 784)
    checks: list[dict[str, Any]] = []
    runners: dict[tuple[int, str], Callable[[np.ndarray], Any]] = {}
    for bits in bits_list:
        want = reference.run(images, bits)
        for backend in [default_backend(bits)] if defaults_only else candidates(bits):
            name, runner = build_runner(artifact, bits, backend, threads)
            got = runner(flat)
            agreement = float((got.argmax(1) == want.argmax(1)).mean())
            max_diff = float(np.abs(got - want).max())
            correct = agreement == 1.0 and max_diff <= LOGIT_TOLERANCE * max(1.0, float(np.abs(want).max()))
            checks.append(
                {"bits": bits, "backend": name, "agreement": agreement, "max_abs_diff": max_diff, "correct": correct}
            )
            runners[bits, name] = runner
            if progress:
                _log(f"profile: {bits:>2} bits {name:<24} agreement {100 * agreement:6.2f} %")
    rows: list[dict[str, Any]] = []
    for batch in batches:
        x = timing_images[:batch]
        timed = time_interleaved({key: functools.partial(run, x) for key, run in runners.items()}, min_ms=min_ms)
        for (bits, name), (walls, cpus) in timed.items():
            rows.append(
                {
                    "bits": bits,
                    "batch": batch,
                    "backend": name,
                    "ms_median": round(statistics.median(walls), 4),
                    "ms_p90": round(percentile(walls, 90), 4),
                    "cpu_ms": round(statistics.median(cpus), 4),
                }
            )
        if progress:
            _log(f"profile: batch {batch:>2} timed on {len(runners)} backends")
    chosen: dict[str, str] = {}
    for bits in bits_list:
        totals = {
            c["backend"]: sum(r["ms_median"] for r in rows if r["bits"] == bits and r["backend"] == c["backend"])
            for c in checks
            if c["bits"] == bits and c["correct"]
        }
        if not totals:
            raise RuntimeError(f"no backend for {bits} bits agrees with the reference engine: {checks[-1]}")
        chosen[str(bits)] = min(totals, key=totals.__getitem__)
        if progress:
            _log(f"profile: {bits:>2} bits sums of medians " + ", ".join(f"{k} {v:.2f} ms" for k, v in totals.items()))
    accuracy = accuracy_table(artifact, images, labels, reference)
    ref_batch = 32 if 32 in batches else max(batches)
    latency = {
        b: next(
            r["ms_median"]
            for r in rows
            if r["bits"] == b and r["backend"] == chosen[str(b)] and r["batch"] == ref_batch
        )
        for b in bits_list
    }
    return {
        "fingerprint": fingerprint(threads),
        "model_sha256": model_sha256(artifact),
        "threads": threads,
        "mode": "quick" if defaults_only else "full",
        "rows": rows,
        "backends": chosen,
        "accuracy": {str(b): accuracy[b] for b in bits_list if b in accuracy},
        "pareto": pareto(latency, {b: accuracy.get(b, 0.0) for b in bits_list}),
        "checks": checks,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def save(profile_: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(profile_, indent=1) + "\n")
    tmp.replace(path)
    return path


def default_path(artifact: Artifact) -> Path:
    """model_store/fashion-resnet.apm -> model_store/fashion-resnet.profile.json"""
    return artifact.path.with_suffix(".profile.json")


def saved_backends(artifact: Artifact) -> dict[str, str] | None:
    """The backend per bits of the model's saved profile (what the server runs), or None without one."""
    path = default_path(artifact)
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text())["backends"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read backends from profile {path}: {exc!r}") from None


def matches(profile_: dict[str, Any], artifact: Artifact, threads: int) -> bool:
    """Whether a saved profile was made on this hardware, thread count and model."""
    return profile_.get("fingerprint") == fingerprint(threads) and profile_.get("model_sha256") == model_sha256(
        artifact
    )


def cache_path(artifact: Artifact, threads: int, cache_dir: str | Path) -> Path:
    """Where this machine's profile of this model is kept: one file per (hardware, threads, model)."""
    key = json.dumps([fingerprint(threads), model_sha256(artifact)], sort_keys=True)
    return Path(cache_dir) / f"{artifact.path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.profile.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "apserve"


def for_this_machine(
    artifact: Artifact, path: str | Path, threads: int = 1, cache_dir: str | Path | None = None
) -> tuple[dict[str, Any], Path]:
    """(profile, its file): the one at ``path`` when it was made on this hardware for this model; else the
    one cached for this machine; else a quick profile made now and cached (a cache that cannot be written
    is only logged: the fresh profile is still returned). ``path`` itself is never overwritten."""
    path = Path(path)
    for candidate in (path, cache_path(artifact, threads, cache_dir or default_cache_dir())):
        try:
            saved = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and matches(saved, artifact, threads):
            return saved, candidate
    _log(f"profile: {path} was made on other hardware, threads or model: a quick profile now (about 20 s)")
    fresh = profile(artifact, threads=threads, check_images=QUICK_CHECK_IMAGES, defaults_only=True, min_ms=QUICK_MIN_MS)
    try:
        candidate.parent.mkdir(parents=True, exist_ok=True)
        save(fresh, candidate)
        _log(f"profile: kept in {candidate}; `apserve profile` makes the full one")
    except OSError as exc:
        _log(f"profile: could not write {candidate} ({exc}); the next start profiles again")
    return fresh, candidate
