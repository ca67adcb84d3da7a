"""The power meter the scheduler reads before each decision and tells about each batch.

Two sources, same interface (``state(now) -> PowerState``, ``record_batch(bits, images, seconds)``,
``source``, ``total_energy_j``):

- ``rapl``: the package energy counters in ``/sys/class/powercap/*/energy_uj`` (Intel RAPL, and AMD on
  recent kernels), where readable. Measured, so it sees everything the machine does.
- ``model``: profiled CPU-seconds per (bits, batch) x watts per busy core + idle watts (policies.energy,
  the same arithmetic the simulator uses). Used where no counter is readable (VMs, containers).

``power_source`` = ``auto`` (default) picks rapl when a counter can be read, else the model.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.base import LatencyProfile, PowerState
from policies.energy import EnergyWindow, PowerModel

POWERCAP = Path("/sys/class/powercap")
SOURCES = ("auto", "rapl", "model")


class PowerError(ValueError):
    """Invalid power settings, or a RAPL source asked for where none can be read."""


@dataclass(frozen=True)
class PowerSettings:
    source: str = "auto"
    watts_per_core: float = 10.0
    idle_w: float = 5.0
    window_s: float = 1.0
    budget_w: float | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise PowerError(f"power source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if not self.window_s > 0:
            raise PowerError(f"power window_s must be > 0, got {self.window_s}")
        if self.budget_w is not None and not self.budget_w > 0:
            raise PowerError(f"power budget_w must be > 0, got {self.budget_w}")
        try:
            PowerModel(self.watts_per_core, self.idle_w)
        except ValueError as exc:
            raise PowerError(f"power model: {exc}") from None


def rapl_counters(root: Path = POWERCAP) -> list[tuple[Path, float]]:
    """Readable top-level package counters: (energy_uj file, wrap-around range in µJ)."""
    found = []
    for zone in sorted(root.glob("*")):
        energy = zone / "energy_uj"
        # top-level zones only ("intel-rapl:0"); sub-zones ("intel-rapl:0:0") are inside their package
        if zone.name.count(":") != 1 or not energy.is_file():
            continue
        try:
            int(energy.read_text())
            wrap = float(int((zone / "max_energy_range_uj").read_text()))
        except (OSError, ValueError):
            continue
        found.append((energy, wrap))
    return found


class ModelMeter:
    """Energy from the profile and the power model; batches are recorded as they finish."""

    source = "model"

    def __init__(self, profile: LatencyProfile, settings: PowerSettings):
        self.profile = profile
        self.settings = settings
        self.model = PowerModel(settings.watts_per_core, settings.idle_w)
        self._window = EnergyWindow(settings.window_s, settings.idle_w)
        self._lock = threading.Lock()  # batches finish on worker threads
        self._started = time.monotonic()

    def record_batch(self, bits: int, images: int, seconds: float, end: float | None = None) -> float:
        """Busy energy (J) of a batch that ran ``seconds`` and ended at ``end`` (monotonic; default now):
        the profiled CPU-seconds of (bits, images) x watts per busy core, spread over the batch's run.
        Profiled, not measured: in service the batch's wall time also holds the HTTP front end's work
        (on one core the event loop preempts the engine), which is not the batch's energy; and what the
        power policy predicts before a batch is then exactly what is charged after it."""
        end = time.monotonic() if end is None else end
        joules = self.model.busy_energy(self.profile, bits, images)
        with self._lock:
            self._window.add(end - seconds, end, joules)
        return joules

    def state(self, now: float) -> PowerState:
        with self._lock:
            energy = self._window.energy_in_window(now)
        return PowerState(
            budget_w=self.settings.budget_w,
            window_s=self.settings.window_s,
            energy_in_window_j=energy,
            idle_w=self.settings.idle_w,
            source=self.source,
            watts_per_core=self.model.watts_per_core,
        )

    @property
    def total_energy_j(self) -> float:
        return self._window.total_busy_j + self.settings.idle_w * (time.monotonic() - self._started)


class RaplMeter:
    """Energy from the RAPL counters: sampled at every ``state``/``record_batch`` call; the energy in the
    window is the counter difference over it (interpolated between samples)."""

    source = "rapl"

    def __init__(self, counters: list[tuple[Path, float]], settings: PowerSettings):
        if not counters:
            raise PowerError(f"no readable RAPL counter under {POWERCAP}/*/energy_uj")
        self.counters = counters
        self.settings = settings
        self._lock = threading.Lock()
        self._last_raw = [self._read(path) for path, _ in counters]
        self._joules = 0.0  # accumulated since start, wrap-arounds undone
        self._samples: deque[tuple[float, float]] = deque([(time.monotonic(), 0.0)])

    @staticmethod
    def _read(path: Path) -> float:
        return float(int(path.read_text()))

    def _sample(self, now: float) -> float:
        with self._lock:
            for i, (path, wrap) in enumerate(self.counters):
                try:
                    raw = self._read(path)
                except (OSError, ValueError):
                    continue  # a transient read error: count this counter next time
                delta = raw - self._last_raw[i]
                if delta < 0:  # the counter wrapped
                    delta += wrap
                self._last_raw[i] = raw
                self._joules += delta / 1e6
            if now >= self._samples[-1][0]:
                self._samples.append((now, self._joules))
            # keep one sample at or before the window's start
            while len(self._samples) > 2 and self._samples[1][0] <= now - self.settings.window_s:
                self._samples.popleft()
            return self._joules

    def _energy_at(self, t: float) -> float:
        samples = list(self._samples)
        if t <= samples[0][0]:
            return samples[0][1]
        for (t0, e0), (t1, e1) in zip(samples, samples[1:], strict=False):
            if t0 <= t <= t1:
                return e0 + (e1 - e0) * (t - t0) / (t1 - t0) if t1 > t0 else e1
        return samples[-1][1]

    def record_batch(self, bits: int, images: int, seconds: float, end: float | None = None) -> float:
        """Energy (J) the package drew while the batch ran (the counter is whole-package: idle included)."""
        end = time.monotonic() if end is None else end
        now_j = self._sample(end)
        return max(now_j - self._energy_at(end - seconds), 0.0)

    def state(self, now: float) -> PowerState:
        energy = self._sample(now)
        first_t = self._samples[0][0]
        covered = now - max(first_t, now - self.settings.window_s)
        in_window = energy - self._energy_at(now - self.settings.window_s)
        if covered < self.settings.window_s:  # just started: the uncovered part at idle
            in_window += self.settings.idle_w * (self.settings.window_s - covered)
        return PowerState(
            budget_w=self.settings.budget_w,
            window_s=self.settings.window_s,
            energy_in_window_j=in_window,
            idle_w=self.settings.idle_w,
            source=self.source,
            watts_per_core=self.settings.watts_per_core,
        )

    @property
    def total_energy_j(self) -> float:
        return self._joules


PowerMeter = ModelMeter | RaplMeter


def make_meter(profile: LatencyProfile, settings: PowerSettings, root: Path = POWERCAP) -> PowerMeter:
    if settings.source == "model":
        return ModelMeter(profile, settings)
    counters = rapl_counters(root)
    if counters:
        return RaplMeter(counters, settings)
    if settings.source == "rapl":
        raise PowerError(f"power source 'rapl' asked for, but no readable counter under {root}/*/energy_uj")
    return ModelMeter(profile, settings)


def meter_from_settings(settings: Any, profile: LatencyProfile) -> PowerMeter:
    """The meter for the server's settings: ``power_source``, ``power_watts_per_core``, ``power_idle_w``,
    ``power_window_s`` when the settings object has them, and the policy's ``budget_w`` option."""
    options = getattr(settings, "policy_options", None) or {}
    budget = options.get("budget_w") if isinstance(options, dict) else None
    defaults = PowerSettings()
    return make_meter(
        profile,
        PowerSettings(
            source=getattr(settings, "power_source", defaults.source),
            watts_per_core=getattr(settings, "power_watts_per_core", defaults.watts_per_core),
            idle_w=getattr(settings, "power_idle_w", defaults.idle_w),
            window_s=getattr(settings, "power_window_s", defaults.window_s),
            budget_w=float(budget) if isinstance(budget, int | float) and not isinstance(budget, bool) else None,
        ),
    )
