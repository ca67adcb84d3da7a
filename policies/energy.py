"""Energy accounting shared by the power policy, the simulator and the server's model meter.

The model: a batch keeps ``cpu_seconds(bits, batch)`` worth of cores busy, each busy core draws
``watts_per_core`` above idle, and the machine draws ``idle_w`` all the time. The rolling window keeps
the energy of recent batches (spread evenly over each batch's run) so the energy in any trailing window
can be read without a clock: the caller says what time it is.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from policies.base import LatencyProfile, PowerState


@dataclass(frozen=True)
class PowerModel:
    watts_per_core: float = 10.0
    idle_w: float = 5.0

    def __post_init__(self) -> None:
        if not self.watts_per_core > 0:
            raise ValueError(f"watts_per_core must be > 0, got {self.watts_per_core}")
        if not self.idle_w >= 0:
            raise ValueError(f"idle_w must be >= 0, got {self.idle_w}")

    def busy_energy(self, profile: LatencyProfile, bits: int, batch: int) -> float:
        """Energy above idle (J) of one batch, from the profiled CPU time."""
        return cpu_seconds(profile, bits, batch) * self.watts_per_core


def cpu_seconds(profile: LatencyProfile, bits: int, batch: int) -> float:
    """Profiled CPU-seconds of one batch; without CPU figures, one busy core for the whole latency."""
    return profile.cpu(bits, batch)


class EnergyWindow:
    """Busy energy of recent batches, for the energy in a trailing window (idle energy added on read)."""

    def __init__(self, window_s: float, idle_w: float = 0.0):
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self.idle_w = idle_w
        self._batches: deque[tuple[float, float, float]] = deque()  # (start, end, busy joules)
        self._sum = 0.0  # busy joules of the batches kept
        self.total_busy_j = 0.0

    def add(self, start: float, end: float, busy_j: float) -> None:
        """Record a batch; batches are added in order of their start."""
        self._batches.append((start, max(end, start), busy_j))
        self._sum += busy_j
        self.total_busy_j += busy_j

    def energy_in_window(self, now: float) -> float:
        """Energy (J) in [now - window_s, now]: idle plus the busy part of every batch in it. ``now`` never
        goes backwards between calls (older batches are forgotten)."""
        horizon = now - self.window_s
        while self._batches and self._batches[0][1] <= horizon:
            self._sum -= self._batches.popleft()[2]
        energy = self._sum
        # batches straddling either edge count in proportion; only a few at each end can
        for start, end, joules in self._batches:
            if start >= horizon:
                break
            energy -= joules * (horizon - start) / (end - start)
        for start, end, joules in reversed(self._batches):
            if end <= now:
                break
            energy -= joules if end == start or start >= now else joules * (end - now) / (end - start)
        return self.idle_w * self.window_s + max(energy, 0.0)

    def state(self, now: float, budget_w: float | None, source: str = "model") -> PowerState:
        return PowerState(
            budget_w=budget_w,
            window_s=self.window_s,
            energy_in_window_j=self.energy_in_window(now),
            idle_w=self.idle_w,
            source=source,
        )
