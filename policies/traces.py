"""Request arrival traces for the simulator: generated (poisson, step, spike, diurnal) or read from CSV.

Generated traces are scaled to ``capacity``, the images per second the server sustains at fixed 8 bits
(full batches), so "3x" means three times what fixed-8 can serve. Deterministic for a seed.

CSV: a header row with ``arrival_s`` (seconds from the start, non-decreasing) and optionally ``slo_ms``
(a per-request SLO; empty = the default), ``precision`` (1..8, 32, ``auto`` or empty) and
``precision_policy`` (``strict`` or ``best_effort``, the default) and ``images`` (images in the request, 1
when empty: a client that batches its own images sends one request of several).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policies.base import ALL_BITS

GENERATED = ("poisson", "step", "spike", "diurnal")


class TraceError(ValueError):
    """An unknown trace name or a malformed trace file; the message names the file, line and field."""


@dataclass(frozen=True)
class Arrival:
    time: float  # seconds from the start of the trace
    slo_ms: float | None = None  # None: the simulation's default SLO
    precision: int | None = None  # None: "auto"
    strict: bool = False
    images: int = 1  # images in the request


@dataclass(frozen=True)
class Trace:
    name: str
    arrivals: tuple[Arrival, ...]
    description: str

    @property
    def duration(self) -> float:
        return self.arrivals[-1].time if self.arrivals else 0.0


def _poisson_times(rng: np.random.Generator, rate: float, start: float, end: float) -> np.ndarray:
    if rate <= 0 or end <= start:
        return np.empty(0)
    n = rng.poisson(rate * (end - start))
    return np.sort(rng.uniform(start, end, size=n))


def _thinned(
    rng: np.random.Generator, rate_fn: Callable[[np.ndarray], np.ndarray], peak: float, duration: float
) -> np.ndarray:
    """Non-homogeneous Poisson by thinning a homogeneous one at the peak rate."""
    times = _poisson_times(rng, peak, 0.0, duration)
    keep = rng.uniform(0.0, peak, size=len(times)) < rate_fn(times)
    return times[keep]


def generate(
    name: str,
    capacity: float,
    seed: int = 0,
    duration: float | None = None,
    load: float | None = None,
) -> Trace:
    """A generated trace. ``load`` scales the base rate (fraction of capacity); defaults per trace:
    poisson 0.5 for 120 s; step 0.5 -> 1.5 at the middle of 120 s; spike 0.5, 3x for 30 s from 60 s, 300 s;
    diurnal 0.3..1.2 over one 240 s period."""
    if not capacity > 0:
        raise TraceError(f"capacity must be > 0, got {capacity}")
    rng = np.random.default_rng(seed)
    base = 0.5 if load is None else load
    if name == "poisson":
        duration = duration or 120.0
        times = _poisson_times(rng, base * capacity, 0.0, duration)
        text = f"poisson at {base:g}x capacity for {duration:g} s"
    elif name == "step":
        duration = duration or 120.0
        half = duration / 2
        high = 3 * base
        times = np.concatenate(
            (_poisson_times(rng, base * capacity, 0.0, half), _poisson_times(rng, high * capacity, half, duration))
        )
        text = f"step {base:g}x -> {high:g}x capacity at {half:g} s of {duration:g} s"
    elif name == "spike":
        duration = duration or 300.0
        start, length = min(60.0, duration / 5), 30.0
        end = min(start + length, duration)
        times = np.concatenate(
            (
                _poisson_times(rng, base * capacity, 0.0, start),
                _poisson_times(rng, 6 * base * capacity, start, end),
                _poisson_times(rng, base * capacity, end, duration),
            )
        )
        text = f"spike {base:g}x capacity, {6 * base:g}x from {start:g} to {end:g} s, {duration:g} s in all"
    elif name == "diurnal":
        duration = duration or 240.0
        low, high = 0.6 * base, 2.4 * base

        def rate(t: np.ndarray) -> np.ndarray:
            return capacity * (low + (high - low) * 0.5 * (1 - np.cos(2 * math.pi * t / duration)))

        times = _thinned(rng, rate, high * capacity, duration)
        text = f"diurnal {low:g}x..{high:g}x capacity over {duration:g} s"
    else:
        raise TraceError(f"unknown trace {name!r}; choose one of {', '.join(GENERATED)} or give a CSV file")
    return Trace(name=name, arrivals=tuple(Arrival(float(t)) for t in times), description=text)


def _precision(text: str, where: str) -> int | None:
    text = text.strip().lower()
    if text in ("", "auto"):
        return None
    try:
        bits = int(text)
    except ValueError:
        bits = -1
    if bits not in ALL_BITS:
        raise TraceError(f"{where}: precision {text!r} must be one of {list(ALL_BITS)} or 'auto'")
    return bits


def _images(text: str, where: str) -> int:
    text = text.strip()
    if not text:
        return 1
    try:
        images = int(text)
    except ValueError:
        images = 0
    if images < 1:
        raise TraceError(f"{where}: images must be a whole number >= 1, got {text!r}")
    return images


def read_csv(path: str | Path) -> Trace:
    path = Path(path)
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace ({exc.strerror or exc})") from None
    arrivals: list[Arrival] = []
    with handle:
        reader = csv.DictReader(handle)
        fields = [f.strip() for f in reader.fieldnames or []]
        if "arrival_s" not in fields:
            raise TraceError(f"{path}: header must name an 'arrival_s' column, got {fields or 'no header'}")
        unknown = set(fields) - {"arrival_s", "slo_ms", "precision", "precision_policy", "images"}
        if unknown:
            raise TraceError(f"{path}: unknown columns {sorted(unknown)}")
        last = 0.0
        for row in reader:
            row = {k.strip(): (v or "") for k, v in row.items() if k is not None}
            where = f"{path}, line {reader.line_num}"
            try:
                time = float(row["arrival_s"])
            except ValueError:
                raise TraceError(f"{where}: arrival_s {row['arrival_s']!r} is not a number") from None
            if not math.isfinite(time) or time < 0:
                raise TraceError(f"{where}: arrival_s must be a finite time >= 0, got {row['arrival_s']!r}")
            if time < last:
                raise TraceError(f"{where}: arrival_s {time:g} is earlier than the previous row ({last:g})")
            last = time
            slo: float | None = None
            if row.get("slo_ms", "").strip():
                try:
                    slo = float(row["slo_ms"])
                except ValueError:
                    slo = -1.0
                if not (math.isfinite(slo) and slo > 0):
                    raise TraceError(f"{where}: slo_ms must be a positive number, got {row['slo_ms']!r}")
            policy = row.get("precision_policy", "").strip().lower() or "best_effort"
            if policy not in ("strict", "best_effort"):
                raise TraceError(f"{where}: precision_policy must be 'strict' or 'best_effort', got {policy!r}")
            precision = _precision(row.get("precision", ""), where)
            if policy == "strict" and precision is None:
                raise TraceError(f"{where}: a strict precision_policy needs a precision")
            images = _images(row.get("images", ""), where)
            arrivals.append(Arrival(time, slo, precision, policy == "strict", images))
    if not arrivals:
        raise TraceError(f"{path}: no arrivals in the trace")
    return Trace(name=path.name, arrivals=tuple(arrivals), description=f"{len(arrivals)} arrivals from {path}")
