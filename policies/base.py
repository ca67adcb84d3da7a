"""What every policy sees and returns. Pure data: no clock, no I/O, no server or engine imports.

The server and the simulator build a ``Snapshot`` of the queue and call ``Policy.decide``; the same code
decides in both. Times are seconds on one monotonic clock; ``now`` is given, never read.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

FP32 = 32
ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FP32)  # in increasing precision


def bits_between(low: int, high: int) -> tuple[int, ...]:
    """Servable bits b with low <= b <= high in precision order (32 is above 8)."""
    return tuple(b for b in ALL_BITS if low <= b <= high)


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    id: int
    arrival: float
    deadline: float | None  # absolute; None: no deadline
    min_bits: int = 1  # hard bounds, inclusive
    max_bits: int = FP32
    preferred_bits: int | None = None  # the client's `precision` hint; None for "auto"
    strict: bool = False  # strict: only preferred_bits may run
    priority: int = 1  # 1 is the highest (as Triton); larger numbers wait
    size: int = 1  # images in this request

    def allows(self, bits: int) -> bool:
        if self.strict and self.preferred_bits is not None:
            return bits == self.preferred_bits
        return self.min_bits <= bits <= self.max_bits

    @property
    def allowed(self) -> tuple[int, ...]:
        return tuple(b for b in ALL_BITS if self.allows(b))


@dataclass(frozen=True)
class LatencyProfile:
    """Measured latency (seconds) per (bits, batch size), from `apserve profile`."""

    table: Mapping[tuple[int, int], float]
    pareto: tuple[int, ...] = ALL_BITS  # bits worth choosing automatically, increasing precision
    cpu_seconds: Mapping[tuple[int, int], float] | None = None  # CPU time per batch, for the power model

    @cached_property
    def batches(self) -> tuple[int, ...]:
        return tuple(sorted({b for _, b in self.table}))

    @cached_property
    def _sizes(self) -> dict[int, list[int]]:
        # the simulator asks for latencies millions of times: index the sizes per bits once
        sizes: dict[int, list[int]] = {}
        for k, b in self.table:
            sizes.setdefault(k, []).append(b)
        return {k: sorted(v) for k, v in sizes.items()}

    @property
    def bits(self) -> tuple[int, ...]:
        """Profiled bits, in increasing precision."""
        return tuple(b for b in ALL_BITS if b in self._sizes)

    @cached_property
    def _memo(self) -> dict[tuple[int, int], float]:
        return {}

    def latency(self, bits: int, batch: int) -> float:
        """Latency of one batch; linear between profiled sizes, extrapolated past the largest."""
        key = (bits, batch)
        cached = self._memo.get(key)
        if cached is None:
            cached = self._memo[key] = self._interpolate(bits, batch)
        return cached

    @cached_property
    def _cpu(self) -> LatencyProfile | None:
        return LatencyProfile(table=self.cpu_seconds) if self.cpu_seconds else None

    def cpu_per_image(self, bits: int, max_batch: int) -> float:
        """The lowest CPU time per image over the profiled batch sizes up to ``max_batch``."""
        key = (bits, max_batch)
        found = self._per_image.get(key)
        if found is None:
            sizes = [b for b in self.batches if b <= max_batch] or [1]
            found = self._per_image[key] = min(self.cpu(bits, b) / b for b in sizes)
        return found

    @cached_property
    def _per_image(self) -> dict[tuple[int, int], float]:
        return {}

    @cached_property
    def _efficient(self) -> dict[tuple[int, int, float], int]:
        return {}

    def cpu_efficient_batch(self, bits: int, max_batch: int, slack: float) -> int:
        """The smallest batch (up to ``max_batch``) whose CPU time per image is within ``slack`` x the
        best batch's: what a power budget buys the most images with."""
        key = (bits, max_batch, slack)
        found = self._efficient.get(key)
        if found is None:
            per_image = [self.cpu(bits, n) / n for n in range(1, max(max_batch, 1) + 1)]
            best = min(per_image)
            found = self._efficient[key] = next(n for n, c in enumerate(per_image, start=1) if c <= slack * best)
        return found

    def cpu(self, bits: int, batch: int) -> float:
        """CPU-seconds of one batch (interpolated as latency is); without CPU figures, the latency."""
        return self._cpu.latency(bits, batch) if self._cpu is not None else self.latency(bits, batch)

    def _interpolate(self, bits: int, batch: int) -> float:
        sizes = self._sizes.get(bits)
        if not sizes:
            raise KeyError(f"no profile for bits {bits}")
        lo = max((s for s in sizes if s <= batch), default=sizes[0])
        hi = min((s for s in sizes if s >= batch), default=sizes[-1])
        t_lo, t_hi = self.table[(bits, lo)], self.table[(bits, hi)]
        if lo == hi:
            return t_lo * max(1.0, batch / lo)
        return t_lo + (t_hi - t_lo) * (batch - lo) / (hi - lo)


@dataclass
class _Recent:
    """A recent level of some observed quantity: exponential smoothing over observations (weight ``up``
    when the new value is higher, ``down`` when lower), relaxing toward ``neutral`` with the half-life
    ``half_life_s`` while nothing is observed. The relaxation matters: a pessimistic level that makes the
    policy refuse everything would otherwise never see the observation that corrects it."""

    neutral: float
    up: float
    down: float
    half_life_s: float = 2.0
    level: float = float("nan")
    at: float = 0.0

    def value(self, now: float) -> float:
        if self.level != self.level:  # nothing observed yet
            return self.neutral
        fade = 0.5 ** (max(0.0, now - self.at) / self.half_life_s)
        return self.neutral + (self.level - self.neutral) * fade

    def _observe(self, x: float, now: float) -> None:
        current = self.value(now)
        self.level = current + (self.up if x > current else self.down) * (x - current)
        self.at = now


@dataclass
class LatencyScale(_Recent):
    """How much longer batches take than the profile says, lately (observed / profiled, bounded). The
    profile measures the engine alone; in service the same cores also parse HTTP, encode replies and run
    whatever else the machine runs, and that share grows with the load. The server and the simulator both
    feed it and hand ``value(now)`` to the policy (``Snapshot.latency_scale``)."""

    neutral: float = 1.0
    up: float = 0.5
    down: float = 0.05
    low: float = 0.5
    high: float = 4.0

    def observe(self, observed_s: float, profiled_s: float, now: float) -> None:
        if profiled_s > 0.0 and observed_s >= 0.0:
            self._observe(min(self.high, max(self.low, observed_s / profiled_s)), now)


@dataclass
class _RecentDelay(_Recent):
    """A recent delay in seconds, each observation capped at ``high`` so that one stall cannot make every
    deadline look hopeless."""

    neutral: float = 0.0
    up: float = 0.1
    down: float = 0.02
    high: float = 0.02

    def observe(self, seconds: float, now: float) -> None:
        if seconds >= 0.0:
            self._observe(min(self.high, seconds), now)


@dataclass
class AnswerDelay(_RecentDelay):
    """Time from a batch's end until its answers are on the wire (encoding, the event loop's backlog),
    lately: rises faster than it falls, to track the high end rather than the mean; bounded
    (``Snapshot.answer_delay_s``). The defaults of ``_RecentDelay`` are its settings."""


@dataclass
class BatchGap(_RecentDelay):
    """Time the engine stands idle between two batches while requests wait, lately: the finished batch's
    results handed to the event loop, the answers, the next decision, the hand-off to a worker thread. It
    is a cost per batch that no profile measures; the event loop takes it on the engine's core, so it
    grows with the load. The planner adds it to every batch (``Snapshot.batch_gap_s``): a queue served in
    many small batches then costs what it really costs. Bounded."""

    up: float = 0.2
    down: float = 0.05
    high: float = 0.01


class ArrivalRate:
    """Images arriving per second over the last ``window_s``: how much work will join the queue while a
    batch runs (``Snapshot.arrival_rate``). The server and the simulator both feed it."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self._arrivals: deque[tuple[float, int]] = deque()
        self._images = 0

    def observe(self, now: float, images: int) -> None:
        self._arrivals.append((now, images))
        self._images += images

    def value(self, now: float) -> float:
        while self._arrivals and self._arrivals[0][0] <= now - self.window_s:
            self._images -= self._arrivals.popleft()[1]
        return self._images / self.window_s


@dataclass(frozen=True)
class PowerState:
    budget_w: float | None  # None: no budget
    window_s: float
    energy_in_window_j: float  # energy spent in the last window_s seconds
    idle_w: float = 0.0
    source: str = "model"  # "rapl" or "model"
    watts_per_core: float | None = None  # the meter's model of a busy core, to predict a batch's energy


@dataclass(frozen=True)
class Snapshot:
    now: float
    queue: tuple[QueuedRequest, ...]  # priority first, then earliest deadline (EDF)
    profile: LatencyProfile
    accuracy: Mapping[int, float]  # expected accuracy per bits (validation split)
    max_batch_size: int
    default_bits: int = 8
    power: PowerState | None = None
    latency_scale: float = 1.0  # LatencyScale.value(now): planned latency = profile x this
    answer_delay_s: float = 0.0  # AnswerDelay.value(now): kept free before every deadline, beside the margin
    arrival_rate: float = 0.0  # ArrivalRate.value(now): images per second arriving lately
    batch_gap_s: float = 0.0  # BatchGap.value(now): the engine's idle time per batch, added to every batch


@dataclass(frozen=True)
class Decision:
    """Run ``requests`` at ``bits`` now; or, when ``bits`` is None, run nothing and decide again at
    ``wait_until`` (or at the next arrival). ``reject`` lists requests refused now (hopeless deadline)."""

    bits: int | None
    requests: tuple[int, ...] = ()
    reason: str = ""
    reject: tuple[int, ...] = ()
    wait_until: float | None = None
    # cascade: after the batch ran, requests whose top softmax probability is below this re-run at escalate_to
    escalate_below: float | None = None
    escalate_to: int | None = None
    # with bits None and wait_until: no arrival that queues behind the current head changes this decision
    # before wait_until (a power budget refilling), so the server and the simulator need not ask again at
    # each one; they refuse at once an arrival that could not finish by its deadline starting at wait_until
    hold: bool = False


IDLE = Decision(bits=None, reason="empty queue")


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    def decide(self, snapshot: Snapshot) -> Decision: ...


@dataclass
class PolicyConfig:
    """Settings shared by policies; each policy module validates its own extras."""

    name: str
    options: dict[str, object] = field(default_factory=dict)
