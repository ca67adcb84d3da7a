"""Reading the profile file (`apserve profile`, format in docs/INTERNALS.md) into what policies use.

The file gives latency and CPU time per (bits, batch) and, when known, accuracy per bits and the Pareto
set. Parsing is strict: a damaged profile must stop the server or the simulator with a message that
names the file and the field, never drive a policy with wrong numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.base import ALL_BITS, LatencyProfile


class ProfileError(ValueError):
    """The profile file is missing, malformed or inconsistent; the message says where."""


@dataclass(frozen=True)
class Profile:
    latency: LatencyProfile
    accuracy: dict[int, float]  # empty when the file has none
    threads: int
    backends: dict[int, str]
    source: str  # the file it came from, or a description


def pareto_bits(latency: LatencyProfile, accuracy: Mapping[int, float], bits: tuple[int, ...]) -> tuple[int, ...]:
    """Bits not dominated by other bits that are at least as accurate and no slower at every profiled batch
    size (and strictly better in one of the two). Bits without a known accuracy are never on the front."""
    sizes = latency.batches
    known = [b for b in bits if b in accuracy]

    def dominates(a: int, b: int) -> bool:
        no_slower = all(latency.latency(a, n) <= latency.latency(b, n) for n in sizes)
        faster = any(latency.latency(a, n) < latency.latency(b, n) for n in sizes)
        return accuracy[a] >= accuracy[b] and no_slower and (faster or accuracy[a] > accuracy[b])

    return tuple(b for b in known if not any(dominates(a, b) for a in known if a != b))


def _bits_key(key: Any, where: str) -> int:
    try:
        bits = int(key)
    except (TypeError, ValueError):
        raise ProfileError(f"{where}: bits {key!r} is not an integer") from None
    if bits not in ALL_BITS:
        raise ProfileError(f"{where}: bits {bits} not servable; expected one of {list(ALL_BITS)}")
    return bits


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ProfileError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def parse_profile(doc: Any, source: str = "<profile>", accuracy: Mapping[int, float] | None = None) -> Profile:
    """Validate a decoded profile document. ``accuracy`` (e.g. from the artifact manifest) is used when
    the file has none; the file's own table wins when both exist."""
    if not isinstance(doc, dict):
        raise ProfileError(f"{source}: expected a JSON object at the top level")
    rows = doc.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ProfileError(f"{source}: 'rows' must be a non-empty list")
    backends_doc = doc.get("backends") or {}
    if not isinstance(backends_doc, dict):
        raise ProfileError(f"{source}: 'backends' must be an object of bits -> name")
    backends = {_bits_key(k, f"{source}: backends"): str(v) for k, v in backends_doc.items()}
    table: dict[tuple[int, int], float] = {}
    cpu: dict[tuple[int, int], float] = {}
    for i, row in enumerate(rows):
        where = f"{source}: rows[{i}]"
        if not isinstance(row, dict):
            raise ProfileError(f"{where}: expected an object")
        for name in ("bits", "batch", "ms_median"):
            if name not in row:
                raise ProfileError(f"{where}: missing {name!r}")
        bits = _bits_key(row["bits"], where)
        batch = row["batch"]
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ProfileError(f"{where}: batch must be a positive integer, got {batch!r}")
        chosen = backends.get(bits)
        if chosen is not None and row.get("backend", chosen) != chosen:
            continue  # a candidate backend the profiler measured but did not choose
        key = (bits, batch)
        if key in table:
            raise ProfileError(f"{where}: duplicate row for bits {bits}, batch {batch}")
        table[key] = _positive(row["ms_median"], f"{where}.ms_median") / 1000.0
        if row.get("cpu_ms") is not None:
            cpu[key] = _positive(row["cpu_ms"], f"{where}.cpu_ms") / 1000.0
    threads = doc.get("threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ProfileError(f"{source}: 'threads' must be a positive integer, got {threads!r}")
    if cpu and set(cpu) != set(table):
        raise ProfileError(f"{source}: 'cpu_ms' must be given on every row or on none")
    if not cpu:  # no CPU time measured: assume every thread busy for the whole batch
        cpu = {key: seconds * threads for key, seconds in table.items()}

    acc: dict[int, float] = {}
    file_acc = doc.get("accuracy") or {}
    if not isinstance(file_acc, dict):
        raise ProfileError(f"{source}: 'accuracy' must be an object of bits -> fraction")
    for acc_key, value in (file_acc or accuracy or {}).items():
        where = f"{source}: accuracy[{acc_key!r}]"
        bits = _bits_key(acc_key, where)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ProfileError(f"{where}: expected a fraction in [0, 1], got {value!r}")
        acc[bits] = float(value)

    profiled = tuple(sorted({b for b, _ in table}, key=ALL_BITS.index))
    for bits in profiled:
        if (bits, 1) not in table:
            raise ProfileError(f"{source}: bits {bits} has no batch-1 row")
    latency = LatencyProfile(table=table, cpu_seconds=cpu)
    if "pareto" in doc and doc["pareto"] is not None:
        if not isinstance(doc["pareto"], list) or not doc["pareto"]:
            raise ProfileError(f"{source}: 'pareto' must be a non-empty list of bits")
        pareto = tuple(sorted({_bits_key(b, f"{source}: pareto") for b in doc["pareto"]}, key=ALL_BITS.index))
        missing = [b for b in pareto if b not in profiled]
        if missing:
            raise ProfileError(f"{source}: pareto bits {missing} have no latency rows")
    elif acc:
        pareto = pareto_bits(latency, acc, profiled)
    else:
        pareto = profiled
    return Profile(
        latency=LatencyProfile(table=table, pareto=pareto, cpu_seconds=cpu),
        accuracy=acc,
        threads=threads,
        backends=backends,
        source=source,
    )


def load_profile(path: str | Path, accuracy: Mapping[int, float] | None = None) -> Profile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read the profile ({exc.strerror or exc}); run `apserve profile`") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON ({exc})") from None
    return parse_profile(doc, str(path), accuracy)


# Expected figures for this model on a 2-core AVX-512 machine (docs/INTERNALS.md, ANCHORS.md), used as a
# stand-in until `apserve profile` has measured the real engine: batch-1 latency in ms per bits, and the
# accuracy per bits of a trained any-precision model. Simulations on it are labelled "synthetic".
STANDIN_MS_BATCH1 = {1: 0.6, 2: 1.5, 3: 1.9, 4: 1.9, 5: 1.9, 6: 1.9, 7: 1.9, 8: 1.9, 32: 3.5}
STANDIN_ACCURACY = {1: 0.89, 2: 0.91, 3: 0.92, 4: 0.925, 5: 0.93, 6: 0.93, 7: 0.93, 8: 0.93, 32: 0.932}
STANDIN_BATCHES = (1, 2, 4, 8, 16, 32, 64)


STANDIN_BACKEND = "standin"  # the stand-in document's backend name: no backend at all


def standin_document(threads: int = 2) -> dict[str, Any]:
    """A profile document from the expected figures: per-image cost falls from 1x at batch 1 to 0.6x at
    batch 8 (log-linear) and stays there; both threads busy throughout."""
    rows = []
    for bits, ms1 in STANDIN_MS_BATCH1.items():
        for n in STANDIN_BATCHES:
            per_image = 1.0 - 0.4 * min(math.log2(n), 3.0) / 3.0
            ms = ms1 * n * per_image
            rows.append({"bits": bits, "batch": n, "backend": STANDIN_BACKEND, "ms_median": ms, "cpu_ms": ms * threads})
    return {
        "fingerprint": {"standin": True},
        "model_sha256": "",
        "threads": threads,
        "rows": rows,
        "backends": {str(b): STANDIN_BACKEND for b in STANDIN_MS_BATCH1},
        "accuracy": {str(b): a for b, a in STANDIN_ACCURACY.items()},
    }


def standin_profile() -> Profile:
    return parse_profile(standin_document(), "synthetic (expected figures, not measured)")
