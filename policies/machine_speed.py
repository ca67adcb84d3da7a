"""How fast the machine ran, over time: a factor on every profiled batch latency, for the simulator.

The profile is a median measured on a quiet machine. A shared VM does not stay that quiet: the same
engine call can take 1.8 x as long for seconds at a time with no steal reported
(bench/bench_speed_noise.py). A server running near its capacity is overloaded in those seconds, and a
simulator that replays the profile cannot see it. Given the speed the machine really had, e.g. measured
by a server during a load test (``apserve_engine_cpu_seconds_total`` over
``apserve_engine_profiled_seconds_total``), the simulator replays it, so that what is left between the two
is the model of the server, not the weather of the machine.

CSV: a header row ``t_s,factor``; from ``t_s`` seconds after the trace's start until the next row, every
batch takes ``factor`` x its profiled latency (1.0 before the first row; the last row holds to the end).
"""

from __future__ import annotations

import bisect
import csv
import math
from dataclasses import dataclass
from pathlib import Path

from policies.traces import TraceError


@dataclass(frozen=True)
class MachineSpeed:
    starts: tuple[float, ...]  # seconds from the trace's start, increasing
    factors: tuple[float, ...]  # engine time / profiled time from each start on

    def __post_init__(self) -> None:
        if len(self.starts) != len(self.factors):
            raise ValueError("starts and factors must have the same length")
        if any(b <= a for a, b in zip(self.starts, self.starts[1:], strict=False)):
            raise ValueError("starts must be increasing")
        if not all(math.isfinite(f) and f > 0 for f in self.factors):
            raise ValueError("factors must be positive numbers")

    def at(self, t: float) -> float:
        i = bisect.bisect_right(self.starts, t) - 1
        return self.factors[i] if i >= 0 else 1.0


def read_csv(path: str | Path) -> MachineSpeed:
    path = Path(path)
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the machine speed ({exc.strerror or exc})") from None
    starts: list[float] = []
    factors: list[float] = []
    with handle:
        reader = csv.DictReader(handle)
        fields = [f.strip() for f in reader.fieldnames or []]
        if sorted(fields) != ["factor", "t_s"]:
            raise TraceError(f"{path}: header must be 't_s,factor', got {fields or 'no header'}")
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            where = f"{path}, line {reader.line_num}"
            try:
                t, factor = float(row["t_s"]), float(row["factor"])
            except ValueError:
                raise TraceError(f"{where}: t_s and factor must be numbers, got {row}") from None
            if not math.isfinite(t) or (starts and t <= starts[-1]):
                raise TraceError(f"{where}: t_s must be finite and later than the previous row's, got {row['t_s']!r}")
            if not (math.isfinite(factor) and factor > 0):
                raise TraceError(f"{where}: factor must be a positive number, got {row['factor']!r}")
            starts.append(t)
            factors.append(factor)
    if not starts:
        raise TraceError(f"{path}: no rows in the machine speed file")
    return MachineSpeed(tuple(starts), tuple(factors))


def write_csv(path: str | Path, speed: MachineSpeed) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t_s", "factor"])
        for t, factor in zip(speed.starts, speed.factors, strict=True):
            writer.writerow([f"{t:.3f}", f"{factor:.4f}"])
