"""Load shapes as offered request rates over time: pure functions, no Locust import.

The locustfile starts a fixed pool of users sized for the shape's top rate and thins each user's Poisson
schedule by `rate(t) / top_rate` (a spike is a change in request rate over warm connections, as behind a
proxy with a connection pool — not a storm of new connections); `arrivals()` draws the same shape as
explicit arrival times, so the simulator (`apserve simulate --trace FILE`) can replay the same load.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

SHAPES = ("constant", "step", "spike", "diurnal", "replay")


class ShapeError(ValueError):
    """A shape setting is invalid; the message names it."""


@dataclass(frozen=True)
class Shape:
    """Offered load: `rate(t)` requests per second for 0 <= t < duration_s."""

    name: str
    duration_s: float
    base_rps: float
    peak_rps: float
    steps: int = 4
    trace_rates: tuple[float, ...] = field(default=())  # replay: requests per 1 s bin

    def rate(self, t: float) -> float:
        if t < 0 or t >= self.duration_s:
            return 0.0
        if self.name == "constant":
            return self.base_rps
        if self.name == "step":
            # `steps` equal plateaus from base to peak
            i = min(int(t / self.duration_s * self.steps), self.steps - 1)
            return self.base_rps + (self.peak_rps - self.base_rps) * i / max(self.steps - 1, 1)
        if self.name == "spike":
            # a quarter at base, half at peak, a quarter back at base (issue 5's spike, scaled to duration)
            return self.peak_rps if self.spike_window[0] <= t < self.spike_window[1] else self.base_rps
        if self.name == "diurnal":
            # one compressed "day": trough at the start and end, peak in the middle
            return self.base_rps + (self.peak_rps - self.base_rps) * 0.5 * (
                1 - math.cos(2 * math.pi * t / self.duration_s)
            )
        if self.name == "replay":
            i = int(t)
            return self.trace_rates[i] if i < len(self.trace_rates) else 0.0
        raise ShapeError(f"unknown shape {self.name!r}; choose one of {', '.join(SHAPES)}")

    @property
    def spike_window(self) -> tuple[float, float]:
        return (0.25 * self.duration_s, 0.75 * self.duration_s)

    @property
    def top_rate(self) -> float:
        """The highest rate the shape reaches (requests/s)."""
        if self.name == "replay":
            return max(self.trace_rates, default=0.0)
        return max(self.base_rps, self.peak_rps)

    def pool_size(self, per_user_rps: float) -> int:
        """Users for the whole run: enough that none exceeds ``per_user_rps`` at the top rate."""
        return max(1, math.ceil(self.top_rate / per_user_rps - 1e-9))

    def expected_requests(self) -> float:
        n = int(math.ceil(self.duration_s * 10))
        return sum(self.rate((i + 0.5) / 10) for i in range(n)) / 10


def read_trace(path: Path) -> list[float]:
    """Arrival times (seconds: column `arrival_s`, `t` or the first) from a CSV trace, sorted."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise ShapeError(f"trace {path}: {exc.strerror or exc}") from None
    if not rows:
        raise ShapeError(f"trace {path} is empty")
    header = [h.strip().lower() for h in rows[0]]
    col = next((header.index(name) for name in ("arrival_s", "t") if name in header), 0)
    skip = 0 if _is_number(rows[0][col]) else 1  # a header row, or arrivals from the first line
    times = []
    for n, row in enumerate(rows[skip:], start=skip + 1):
        try:
            t = float(row[col])
        except (ValueError, IndexError):
            raise ShapeError(f"trace {path} line {n}: arrival time is not a number: {row!r}") from None
        if not math.isfinite(t) or t < 0:
            raise ShapeError(f"trace {path} line {n}: arrival time {t} must be finite and >= 0")
        times.append(t)
    if not times:
        raise ShapeError(f"trace {path} has no arrivals")
    return sorted(times)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def trace_rates(times: list[float]) -> tuple[float, ...]:
    """Requests per 1 s bin."""
    bins = [0.0] * (int(max(times)) + 1)
    for t in times:
        bins[int(t)] += 1
    return tuple(bins)


def build_shape(
    name: str,
    duration_s: float = 60.0,
    base_rps: float = 20.0,
    peak_rps: float | None = None,
    steps: int = 4,
    trace: Path | None = None,
) -> Shape:
    if name not in SHAPES:
        raise ShapeError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    if name == "replay":
        if trace is None:
            raise ShapeError("shape replay needs a trace CSV (--trace FILE)")
        rates = trace_rates(read_trace(trace))
        duration_s = min(duration_s, float(len(rates))) if duration_s > 0 else float(len(rates))
        return Shape(name, duration_s, base_rps=0.0, peak_rps=max(rates), trace_rates=rates)
    peak = 3 * base_rps if peak_rps is None else peak_rps
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise ShapeError(f"duration must be > 0 seconds, got {duration_s}")
    if not (base_rps > 0 and math.isfinite(base_rps)):
        raise ShapeError(f"base rate must be > 0 requests/s, got {base_rps}")
    if not (peak >= base_rps and math.isfinite(peak)):
        raise ShapeError(f"peak rate {peak} must be >= the base rate {base_rps}")
    if steps < 1:
        raise ShapeError(f"steps must be >= 1, got {steps}")
    return Shape(name, float(duration_s), float(base_rps), float(peak), steps=steps)


def shape_from_env(env: Mapping[str, str]) -> Shape | None:
    """The shape the locustfile runs, from LOADTEST_* variables (None: plain -u/-r/-t)."""
    name = env.get("LOADTEST_SHAPE", "").strip()
    if not name:
        return None
    try:
        return build_shape(
            name,
            duration_s=float(env.get("LOADTEST_DURATION_S", "60")),
            base_rps=float(env.get("LOADTEST_BASE_RPS", "20")),
            peak_rps=float(env["LOADTEST_PEAK_RPS"]) if env.get("LOADTEST_PEAK_RPS") else None,
            steps=int(env.get("LOADTEST_STEPS", "4")),
            trace=Path(env["LOADTEST_TRACE"]) if env.get("LOADTEST_TRACE") else None,
        )
    except ValueError as exc:
        raise ShapeError(f"LOADTEST_* settings: {exc}") from None


def arrivals(shape: Shape, seed: int = 0) -> list[float]:
    """Poisson arrival times following `shape.rate` (thinning), deterministic for a seed."""
    rng = random.Random(seed)
    top = shape.top_rate or 1.0
    times: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(top)
        if t >= shape.duration_s:
            return times
        if rng.random() * top < shape.rate(t):
            times.append(t)


def write_trace(path: Path, times: list[float], slo_ms: float | None = None, images: int = 1) -> None:
    """A CSV trace (`arrival_s`, optional `slo_ms`, and `images` when a request carries more than one) for
    `apserve simulate --trace` and the replay shape."""
    extra = {name: value for name, value in (("slo_ms", slo_ms), ("images", images if images > 1 else None)) if value}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arrival_s", *extra])
        for t in times:
            w.writerow([f"{t:.6f}", *extra.values()])
