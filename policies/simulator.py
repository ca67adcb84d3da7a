"""Discrete-event simulation of the server: the real policy code on a trace, with the profiled latency.

Each replica is one server: a queue ordered by priority then deadline, one engine that runs one batch at
a time (with all its threads), a power meter (the model in policies.energy). Arrivals go to the replica
with the fewest queued-or-running requests (join-shortest-queue). Whenever a replica is free it asks its
own policy instance for a decision, exactly like the scheduler: refused requests are refused, ``bits``
None waits until ``wait_until`` or the next arrival, a cascade decision re-runs the escalated rows at
``escalate_to`` right after the batch. A request whose deadline passes in the queue is dropped (the
server answers 504). Everything random comes from one seeded generator: a seed gives one result.

The front end (HTTP in and out) shares the engine's core when ``request_cost_s`` > 0: at an arrival rate
of r requests per second (over the last second; a request of several images counts once) it takes
r * request_cost_s of the core, and a batch that needs L seconds of engine time takes L / (1 - that share).
``batch_cost_s`` adds the scheduler's own work per batch (the server's worker joins, accounts for and
follows each batch, ``apserve_worker_cpu_seconds_total``): at b batches per second, b * batch_cost_s more
of the core. A policy that runs many small batches (``power`` under its budget) pays it per batch, not per
request. The policy sees what batches really took through ``Snapshot.latency_scale``, exactly as the
server's scheduler measures it.

``machine_speed`` replays how fast the machine itself ran (policies.machine_speed): a batch starting at t
takes its profiled latency x ``machine_speed.at(t)`` before the front end's share. The energy charged stays
the profiled one, as the server's power model charges it.

Two delays of the server that the share above does not cover, both constants measured on a running server
(``apserve_batch_gap_seconds``, ``apserve_answer_delay_seconds``) and 0 unless given:
- ``batch_gap_s``: the engine stands idle that long before a batch that follows another while requests
  wait (the worker accounts for its batch and takes the next decision);
- ``answer_delay_s``: an answer leaves the server that long after its batch's end (the event loop writes
  it): a request counts as served then, for its deadline and its latency.
Both reach the policy as the server's do (``Snapshot.batch_gap_s``, ``Snapshot.answer_delay_s``).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from policies.base import (
    AnswerDelay,
    ArrivalRate,
    BatchGap,
    Decision,
    LatencyScale,
    Policy,
    PowerState,
    QueuedRequest,
    Snapshot,
)
from policies.energy import EnergyWindow, PowerModel
from policies.machine_speed import MachineSpeed
from policies.profile import Profile
from policies.traces import Trace


@dataclass(frozen=True)
class CascadeOutcome:
    """How a cascade behaves on real images (from policies.cascade.calibrate on the validation split)."""

    escalated_fraction: float
    accuracy_kept: float
    accuracy_escalated: float


@dataclass(frozen=True)
class SimConfig:
    slo_ms: float = 50.0
    max_batch_size: int = 32
    replicas: int = 1
    default_bits: int = 8
    seed: int = 0
    power_model: PowerModel = PowerModel()
    window_s: float = 1.0
    budget_w: float | None = None  # reported to the policy in the power state
    cascade: CascadeOutcome | None = None
    request_cost_s: float = 0.0  # front-end CPU per request on the engine's core (see the module doc)
    batch_cost_s: float = 0.0  # the scheduler's CPU per batch on the engine's core (see the module doc)
    machine_speed: MachineSpeed | None = None  # None: the machine always runs as profiled
    batch_gap_s: float = 0.0  # engine idle before a batch that follows another (see the module doc)
    answer_delay_s: float = 0.0  # from a batch's end until its answers are sent


@dataclass
class SimResult:
    policy: str
    trace: str
    requests: int
    slo_attainment: float
    served_accuracy: float
    p50_ms: float
    p99_ms: float
    rejected: int
    energy_j: float
    max_window_power_w: float
    expired: int = 0
    served: int = 0
    busy_energy_j: float = 0.0
    duration_s: float = 0.0
    bits_served: dict[str, int] = field(default_factory=dict)
    escalated: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "trace": self.trace,
            "requests": self.requests,
            "slo_attainment": self.slo_attainment,
            "served_accuracy": self.served_accuracy,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "rejected": self.rejected,
            "energy_j": self.energy_j,
            "max_window_power_w": self.max_window_power_w,
            "expired": self.expired,
            "served": self.served,
            "busy_energy_j": self.busy_energy_j,
            "energy_per_request_j": self.energy_j / self.requests if self.requests else 0.0,
            "busy_energy_per_request_j": self.busy_energy_j / self.requests if self.requests else 0.0,
            "duration_s": self.duration_s,
            "bits_served": self.bits_served,
            "escalated": self.escalated,
        }


def fixed8_capacity(profile: Profile, max_batch_size: int, bits: int = 8) -> float:
    """Images per second at ``bits`` with full batches: what "1x" means in the generated traces."""
    return max_batch_size / profile.latency.latency(bits, max_batch_size)


_ARRIVAL, _DONE, _WAKE = 0, 1, 2


class _Replica:
    def __init__(self, index: int, policy: Policy, config: SimConfig):
        self.index = index
        self.policy = policy
        self.queue: list[tuple[tuple[int, float, float, int], QueuedRequest]] = []
        self.busy_until: float | None = None
        self.window = EnergyWindow(config.window_s, config.power_model.idle_w)
        self.segments: list[tuple[float, float, float]] = []  # (start, end, busy joules)
        self.wake_at: float | None = None
        self.hold: tuple[float, tuple[int, float, float, int]] | None = None  # (until, head's key): Decision.hold
        self.scale = LatencyScale()
        self.rate = ArrivalRate()  # images over the last second: what the policy plans with, as the server's
        self.request_rate = ArrivalRate()  # requests over the last second: what the front end costs
        self.batch_rate = ArrivalRate()  # batches started over the last second
        self.gap = BatchGap()
        self.answer_delay = AnswerDelay()

    def slowdown(self, now: float, config: SimConfig) -> float:
        """Engine time -> wall time while the front end and the scheduler take their share of the core."""
        share = self.request_rate.value(now) * config.request_cost_s + self.batch_rate.value(now) * config.batch_cost_s
        return 1.0 / (1.0 - min(0.9, share))

    def load(self) -> int:
        return len(self.queue) + (1 if self.busy_until is not None else 0)


def simulate(
    policy_factory: Callable[[], Policy],
    trace: Trace,
    profile: Profile,
    config: SimConfig = SimConfig(),
) -> SimResult:
    if config.replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {config.replicas}")
    if config.max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {config.max_batch_size}")
    if not (0.0 <= config.request_cost_s < 1.0 and 0.0 <= config.batch_cost_s < 1.0):
        raise ValueError("request_cost_s and batch_cost_s must be in [0, 1) seconds")
    if not (0.0 <= config.batch_gap_s < 1.0 and 0.0 <= config.answer_delay_s < 1.0):
        raise ValueError("batch_gap_s and answer_delay_s must be in [0, 1) seconds")
    rng = np.random.default_rng(config.seed)
    latency = profile.latency
    accuracy = profile.accuracy
    replicas = [_Replica(i, policy_factory(), config) for i in range(config.replicas)]
    name = replicas[0].policy.name
    model = config.power_model

    arrivals = trace.arrivals
    n = len(arrivals)
    finish = np.full(n, np.nan)  # completion time per request (nan: not served)
    acc_served = np.full(n, np.nan)
    bits_of = np.zeros(n, dtype=np.int64)
    rejected = expired = escalated_rows = 0
    requests: dict[int, QueuedRequest] = {}

    events: list[tuple[float, int, int, int]] = [(a.time, _ARRIVAL, i, i) for i, a in enumerate(arrivals)]
    heapq.heapify(events)
    seq = n

    def push(time: float, kind: int, payload: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (time, kind, seq, payload))

    def power_state(rep: _Replica, now: float) -> PowerState:
        return PowerState(
            budget_w=config.budget_w,
            window_s=config.window_s,
            energy_in_window_j=rep.window.energy_in_window(now),
            idle_w=model.idle_w,
            source="model",
            watts_per_core=model.watts_per_core,
        )

    def dispatch(rep: _Replica, now: float, following: bool = False) -> None:
        """``following``: the replica has just finished a batch (its next one starts after the gap)."""
        nonlocal rejected, expired, escalated_rows
        if rep.busy_until is not None or not rep.queue:
            return
        live = []
        for key, req in rep.queue:
            if req.deadline is not None and req.deadline < now:
                expired += 1
            else:
                live.append((key, req))
        rep.queue = live
        if not live:
            return
        snapshot = Snapshot(
            now=now,
            queue=tuple(r for _, r in live),
            profile=latency,
            accuracy=accuracy,
            max_batch_size=config.max_batch_size,
            default_bits=config.default_bits,
            power=power_state(rep, now),
            latency_scale=rep.scale.value(now),
            arrival_rate=rep.rate.value(now),
            batch_gap_s=rep.gap.value(now),
            answer_delay_s=rep.answer_delay.value(now),
        )
        decision: Decision = rep.policy.decide(snapshot)
        rep.hold = None
        drop = set(decision.reject)
        rejected += len(drop)
        chosen = set(decision.requests) if decision.bits is not None else set()
        unknown = (drop | chosen) - {r.id for _, r in live}
        if unknown:
            raise RuntimeError(f"{name} decided on requests not in the queue: {sorted(unknown)[:5]}")
        rep.queue = [(k, r) for k, r in live if r.id not in drop and r.id not in chosen]
        if decision.bits is None:
            if decision.wait_until is not None and rep.queue:
                when = max(decision.wait_until, now + 1e-6)
                if decision.hold:
                    rep.hold = (when, rep.queue[0][0])
                if rep.wake_at is None or when < rep.wake_at or rep.wake_at <= now:
                    rep.wake_at = when
                    push(when, _WAKE, rep.index)
            return
        if not chosen:
            raise RuntimeError(f"{name} chose bits {decision.bits} for no request")
        batch = [requests[i] for i in decision.requests]
        images = sum(r.size for r in batch)
        bits = decision.bits
        engine_s = latency.latency(bits, images)
        busy = model.busy_energy(latency, bits, images)
        escalate = np.zeros(len(batch), dtype=bool)
        if decision.escalate_below is not None and decision.escalate_to is not None and config.cascade:
            # per request: a request of several images escalates whole (the server re-runs only its unsure
            # rows; the expected number of images re-run is the same)
            escalate = rng.random(len(batch)) < config.cascade.escalated_fraction
            k = sum(r.size for r, up in zip(batch, escalate, strict=True) if up)
            if k:
                engine_s += latency.latency(decision.escalate_to, k)
                busy += model.busy_energy(latency, decision.escalate_to, k)
                escalated_rows += k
        profiled_s = engine_s
        if config.machine_speed is not None:
            engine_s *= config.machine_speed.at(now)
        rep.batch_rate.observe(now, 1)
        wall_s = engine_s * rep.slowdown(now, config)
        start = now + config.batch_gap_s if following else now
        end = start + wall_s
        rep.scale.observe(wall_s, profiled_s, end)
        if following:
            rep.gap.observe(config.batch_gap_s, end)
        rep.answer_delay.observe(config.answer_delay_s, end + config.answer_delay_s)
        for req, up in zip(batch, escalate, strict=True):
            finish[req.id] = end + config.answer_delay_s
            if decision.escalate_to is not None and config.cascade is not None:
                acc = config.cascade.accuracy_escalated if up else config.cascade.accuracy_kept
                bits_of[req.id] = decision.escalate_to if up else bits
            else:
                acc = accuracy.get(bits, np.nan)
                bits_of[req.id] = bits
            acc_served[req.id] = acc
        rep.window.add(start, end, busy)
        rep.segments.append((start, end, busy))
        rep.busy_until = end
        push(end, _DONE, rep.index)

    slo_s = config.slo_ms / 1000.0
    while events:
        now, kind, _, payload = heapq.heappop(events)
        if kind == _ARRIVAL:
            a = arrivals[payload]
            slo = (a.slo_ms / 1000.0) if a.slo_ms is not None else slo_s
            req = QueuedRequest(
                id=payload,
                arrival=a.time,
                deadline=a.time + slo,
                preferred_bits=a.precision,
                strict=a.strict,
                size=a.images,
            )
            requests[payload] = req
            rep = min(replicas, key=lambda r: (r.load(), r.index))
            rep.rate.observe(now, req.size)
            rep.request_rate.observe(now, 1)
            key = (req.priority, req.deadline if req.deadline is not None else float("inf"), req.arrival, req.id)
            held_until = rep.hold[0] if rep.hold is not None and now < rep.hold[0] and key > rep.hold[1] else None
            if held_until is not None and req.deadline is not None:
                # as the server's admission: refused at once if it cannot finish starting when the hold ends
                fastest = min(latency.latency(b, req.size) for b in latency.bits if req.allows(b))
                if held_until + fastest * rep.scale.value(now) + rep.gap.value(now) > req.deadline:
                    rejected += 1
                    continue
            bisect.insort(rep.queue, (key, req), key=lambda item: item[0])
            if held_until is None:
                dispatch(rep, now)
        elif kind == _DONE:
            rep = replicas[payload]
            rep.busy_until = None
            dispatch(rep, now, following=True)
        else:
            rep = replicas[payload]
            if rep.wake_at is not None and rep.wake_at <= now:
                rep.wake_at = None
            dispatch(rep, now)
    for rep in replicas:  # anything still queued never ran: its deadline passed with no event left
        expired += len(rep.queue)

    served = ~np.isnan(finish)
    deadlines = np.array([a.time + ((a.slo_ms / 1000.0) if a.slo_ms is not None else slo_s) for a in arrivals])
    times = np.array([a.time for a in arrivals])
    latency_ms = (finish[served] - times[served]) * 1000.0
    met = served & (np.nan_to_num(finish, nan=np.inf) <= deadlines + 1e-12)
    end_time = max(
        [times[-1] if n else 0.0]
        + [r.busy_until or 0.0 for r in replicas]
        + [s[1] for r in replicas for s in r.segments[-1:]]
    )
    busy_total = sum(s[2] for r in replicas for s in r.segments)
    idle_total = model.idle_w * end_time * len(replicas)
    bits_count = {str(b): int(c) for b, c in zip(*np.unique(bits_of[served], return_counts=True), strict=True)}
    return SimResult(
        policy=name,
        trace=trace.name,
        requests=n,
        slo_attainment=float(met.sum() / n) if n else 1.0,
        served_accuracy=float(np.nanmean(acc_served[served])) if served.any() else 0.0,
        p50_ms=float(np.percentile(latency_ms, 50)) if len(latency_ms) else 0.0,
        p99_ms=float(np.percentile(latency_ms, 99)) if len(latency_ms) else 0.0,
        rejected=rejected,
        energy_j=idle_total + busy_total,
        max_window_power_w=max(max_window_power(r.segments, config.window_s, model.idle_w) for r in replicas),
        expired=expired,
        served=int(served.sum()),
        busy_energy_j=busy_total,
        duration_s=end_time,
        bits_served=bits_count,
        escalated=escalated_rows,
    )


def max_window_power(segments: list[tuple[float, float, float]], window_s: float, idle_w: float) -> float:
    """Highest average power over any ``window_s`` window (idle before the start), for non-overlapping
    busy segments (start, end, joules). The maximum of a sliding integral of a piecewise-constant power
    is reached with a window edge on a breakpoint, so only those windows are checked."""
    if not segments:
        return idle_w
    starts = np.array([s[0] for s in segments])
    ends = np.array([s[1] for s in segments])
    joules = np.array([s[2] for s in segments])
    points = np.concatenate((starts, ends))
    cumulative_at_end = np.cumsum(joules)
    # cumulative busy energy B(t) is linear inside each segment and flat between: sample it at the
    # segment edges and interpolate
    xs = np.empty(2 * len(segments))
    ys = np.empty(2 * len(segments))
    xs[0::2], xs[1::2] = starts, ends
    ys[0::2], ys[1::2] = cumulative_at_end - joules, cumulative_at_end
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    t = np.concatenate((points, points + window_s))
    energy = np.interp(t, xs, ys) - np.interp(t - window_s, xs, ys)
    return float(idle_w + energy.max() / window_s)
