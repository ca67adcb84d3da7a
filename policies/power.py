"""`power`: keep the rolling average power over the meter's window at or under a budget (watts).

Before each batch: the energy the meter saw in the last window (idle included) plus the predicted busy
energy of the batch must fit ``budget_w * window_s``. While a batch runs, the window drops at least the
idle energy it gains, so the check made at the start holds until the batch ends. Among what fits: the most
accurate candidate bits (planning.Planner.candidates) that the budget could sustain at the current arrival
rate, with the fullest batch; failing that, the cheapest bits with as many images as fit; failing
that, wait until the budget has refilled at ``budget - idle`` watts.

Sustain means: arrivals per second x the bits' lowest energy per image over batch sizes up to
``max_batch_size`` <= ``budget - idle`` (the lowest, because a budget-bound queue grows into larger,
cheaper batches by itself). Without it, an overloaded queue that drains to one or two requests between
refills gets them at the most accurate bits the window's last joules allow (fp32 costs 3.4 times 1 bit
per image on the bundled profile), and every such answer costs several cheap ones that are then refused. With no arrival rate known, every bits is
taken as sustainable.

Images per joule: a batch of one or two images costs up to 1.7 times the energy per image of a full one.
When the window pays for less than an efficient batch (``PowerCap.efficient_batch``) and the head can
still make its deadline once the window has refilled for one, the policy waits for it; and while more
arrives than the budget sustains at the cheapest bits, a head that cannot wait for an efficient batch is
refused (``rushed_for_efficiency``) rather than served alone with the energy of the requests behind it.
A wait for the budget holds (``Decision.hold``): an arrival behind the head cannot make the window refill
sooner, so the server need not ask again before the wait ends; what would be hopeless by then is refused
with the wait.

Choosing bits for deadlines is not this policy's business (`composite` adds it), but spending the budget on
late answers would be: a request that cannot finish by its deadline less ``margin_ms`` even started now,
alone, at its cheapest bits is refused, and a batch ends before its first member that would finish later
than that. Without this, a budget-bound queue is served in arrival order at the brink of every deadline,
and the client, who also waits for what the profile does not see (HTTP, the network), gets it late.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from policies.base import IDLE, Decision, PowerState, QueuedRequest, Snapshot
from policies.energy import cpu_seconds
from policies.planning import Planner, take_fitting

DEFAULT_WATTS_PER_CORE = 10.0
EFFICIENT_SLACK = 1.15  # an efficient batch: energy per image within this of the best batch's


@dataclass(frozen=True)
class PowerCap:
    """Does a batch fit the remaining energy of the window? Built per snapshot."""

    headroom_j: float
    refill_w: float
    window_s: float
    watts_per_core: float
    planner: Planner

    @classmethod
    def of(cls, snapshot: Snapshot, budget_w: float, watts_per_core: float, planner: Planner) -> PowerCap:
        power = snapshot.power or PowerState(budget_w=budget_w, window_s=1.0, energy_in_window_j=0.0)
        wpc = power.watts_per_core or watts_per_core
        return cls(
            headroom_j=budget_w * power.window_s - power.energy_in_window_j,
            refill_w=budget_w - power.idle_w,
            window_s=power.window_s,
            watts_per_core=wpc,
            planner=planner,
        )

    def energy(self, bits: int, images: int) -> float:
        return cpu_seconds(self.planner.profile, bits, images) * self.watts_per_core

    def accept(self, bits: int, images: int) -> bool:
        return self.energy(bits, images) <= self.headroom_j

    def sustainable(self, bits: int, arrival_rate: float, max_batch_size: int) -> bool:
        """Could the budget refill keep up with every arrival served at ``bits``, batched at best?"""
        per_image_j = self.planner.profile.cpu_per_image(bits, max_batch_size) * self.watts_per_core
        return arrival_rate * per_image_j <= self.refill_w

    def efficient_batch(self, bits: int, max_batch_size: int) -> int:
        """The smallest batch whose energy per image is within EFFICIENT_SLACK x the best batch's."""
        return self.planner.profile.cpu_efficient_batch(bits, max_batch_size, EFFICIENT_SLACK)

    def refilled(self, now: float, bits: int, images: int) -> float:
        """When the window will have refilled enough for a batch of ``images`` at ``bits`` (inf: never)."""
        if self.refill_w <= 0:
            return float("inf")
        return now + max(self.energy(bits, images) - self.headroom_j, 0.0) / self.refill_w

    def wait(self, now: float, bits: int, images: int, reject: tuple[int, ...] = ()) -> Decision:
        """Wait until the window pays for ``images`` at ``bits``."""
        if self.refill_w <= 0:
            return Decision(bits=None, reason="power budget at or below idle power", reject=reject)
        exhausted = not self.accept(bits, 1)
        # at least 1/200 of the window, so a scheduler does not spin on a window that refills continuously
        return Decision(
            bits=None,
            reason="power budget exhausted" if exhausted else "power budget: waiting for an efficient batch",
            reject=reject,
            wait_until=max(self.refilled(now, bits, images), now + self.window_s / 200),
            hold=True,
        )


@dataclass(frozen=True)
class PowerPolicy:
    budget_w: float
    watts_per_core: float = DEFAULT_WATTS_PER_CORE
    margin_ms: float = 2.0  # held back from every deadline, as slo's: what the profile does not see
    name: str = "power"

    def decide(self, snapshot: Snapshot) -> Decision:
        if not snapshot.queue:
            return IDLE
        planner = Planner(snapshot, self.margin_ms / 1000.0)
        now = snapshot.now
        reject = _hopeless(planner, snapshot.queue, now)
        refused = set(reject)
        queue = [r for r in snapshot.queue if r.id not in refused]
        if not queue:
            return Decision(bits=None, reason="all queued requests would be late", reject=reject)
        cap = PowerCap.of(snapshot, self.budget_w, self.watts_per_core, planner)
        rushed = rushed_for_efficiency(planner, cap, queue, snapshot)
        if rushed:
            reject += rushed
            queue = queue[len(rushed) :]
            if not queue:
                return Decision(bits=None, reason="queued requests cannot wait for an efficient batch", reject=reject)
        head = queue[0]
        candidates = planner.candidates(head)
        if not candidates:
            return Decision(bits=None, reason="no bits allowed for the head request", reject=reject)
        cheapest = planner.cheapest(head)
        assert cheapest is not None
        target = budget_target(planner, cap, queue, now, snapshot.max_batch_size)
        if not cap.accept(cheapest, head.size):  # exhausted: nothing can run, skip the search
            return _held(planner, cap.wait(now, cheapest, target, reject), queue)
        for bits in candidates:
            if bits != cheapest and not cap.sustainable(bits, snapshot.arrival_rate, snapshot.max_batch_size):
                continue
            batch = planner.fill(queue, bits)
            on_time = planner.fitting_prefix(batch, bits, now)
            if on_time and cap.accept(bits, sum(r.size for r in batch)):
                ids = tuple(r.id for r in batch[:on_time])
                return Decision(bits=bits, requests=ids, reason="within budget", reject=reject)
        batch = take_fitting(planner, queue, cheapest, cap.accept)
        batch = batch[: planner.fitting_prefix(batch, cheapest, now)]
        if batch and sum(r.size for r in batch) >= target:
            ids = tuple(r.id for r in batch)
            return Decision(bits=cheapest, requests=ids, reason="budget-limited batch", reject=reject)
        return _held(planner, cap.wait(now, cheapest, target, reject), queue)


def budget_target(
    planner: Planner, cap: PowerCap, queue: Sequence[QueuedRequest], now: float, max_batch_size: int
) -> int:
    """Images to wait for when the window is short: an efficient batch at the head's cheapest bits when
    all of it makes its deadline once the window has refilled for it (a batch of 1 or 2 images costs up
    to 1.7 x the energy per image of a full one at 1 bit on the bundled profile), else the head alone."""
    head = queue[0]
    bits = planner.cheapest(head)
    if bits is None:
        return head.size
    images, on_time = _efficient_wait(planner, cap, queue, bits, now, max_batch_size)
    return images if on_time else head.size


def rushed_for_efficiency(
    planner: Planner, cap: PowerCap, queue: Sequence[QueuedRequest], snapshot: Snapshot
) -> tuple[int, ...]:
    """With more arriving than the budget sustains at the cheapest bits: the leading requests of ``queue``
    (the snapshot's, or what is left of it) that cannot wait for an efficient batch (one that the budget
    allows by their deadline). Serving them alone costs up to 1.7 x the energy per image of an efficient
    batch, taken from the requests behind them; the queue holds enough to fill efficient batches, and the
    budget, not the queue, is what runs short."""
    rushed: list[int] = []
    for i, head in enumerate(queue):
        bits = planner.cheapest(head)
        if bits is None or cap.sustainable(bits, snapshot.arrival_rate, snapshot.max_batch_size):
            break
        images, on_time = _efficient_wait(planner, cap, queue[i:], bits, snapshot.now, snapshot.max_batch_size)
        if on_time or images < cap.efficient_batch(bits, snapshot.max_batch_size):
            break  # it can wait, or the queue is too short to fill one: refusing gains nothing
        rushed.append(head.id)
    return tuple(rushed)


def _efficient_wait(
    planner: Planner, cap: PowerCap, queue: Sequence[QueuedRequest], bits: int, now: float, max_batch_size: int
) -> tuple[int, bool]:
    """The images of an efficient batch at ``bits`` from the head of ``queue``, and whether all of it
    makes its deadlines when it starts as soon as the window has refilled for it."""
    efficient = planner.fill(queue, bits, max_images=cap.efficient_batch(bits, max_batch_size))
    images = sum(r.size for r in efficient)
    start = max(now, cap.refilled(now, bits, images))
    return images, planner.fitting_prefix(efficient, bits, start) == len(efficient)


def _held(planner: Planner, wait: Decision, queue: Sequence[QueuedRequest]) -> Decision:
    """A wait for the budget holds (``Decision.hold``: arrivals behind the head do not change it), so the
    requests already hopeless by its end are refused now, not left to expire during it."""
    if wait.wait_until is None:
        return wait
    refused = set(wait.reject)
    late = tuple(i for i in _hopeless(planner, queue, wait.wait_until) if i not in refused)
    return replace(wait, reject=wait.reject + late) if late else wait


def _hopeless(planner: Planner, queue: Sequence[QueuedRequest], now: float) -> tuple[int, ...]:
    """The requests late by their deadline less the margin even if started ``now``, alone, at their cheapest
    bits (``Planner.fitting_prefix`` of one request, without its loop: asked at every decision, over
    queues of hundreds)."""
    hopeless = []
    for req in queue:
        if req.deadline is None:
            continue
        latency = planner.alone(req)
        if latency is not None and now + latency > req.deadline - planner.margin_s:
            hopeless.append(req.id)
    return tuple(hopeless)
