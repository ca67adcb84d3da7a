"""The scheduler: admission, the priority/EDF queue, policy decisions, batching, deadlines, escalation.

The event loop admits requests, owns their futures and answers them; worker threads run ``Engine.run``, so
the loop never blocks on compute. Decisions are taken by whichever thread is there first: the loop when an
arrival finds a worker free, the worker itself when it finishes a batch with requests waiting (it accounts
for the batch, decides and starts the next one, and hands the answers to the loop). A lock guards the queue
and the policy's inputs. The queue is ordered by priority (1 first), then deadline (earliest first), then
arrival. At each decision point the active policy gets a ``Snapshot`` and returns a ``Decision``; every
field of the decision is honoured. Each request with a deadline has a timer from admission until it is
answered: if it fires while the request is still queued, the request is answered 504 without being computed.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from policies.base import (
    AnswerDelay,
    ArrivalRate,
    BatchGap,
    Decision,
    LatencyProfile,
    LatencyScale,
    Policy,
    PowerState,
    QueuedRequest,
    Snapshot,
)
from policies.fixed import FixedPolicy
from server.metrics import Metrics, bits_label
from server.protocol import RequestOptions

log = logging.getLogger("apserve.scheduler")
POWER_REFRESH_S = 0.005


class Runner(Protocol):
    """What the scheduler needs of the engine (kernels.engine.Engine)."""

    def run(self, batch: np.ndarray, bits: int) -> np.ndarray: ...


class PowerMeter(Protocol):
    def state(self, now: float) -> PowerState: ...


class Refused(Exception):
    """A request answered without a result: HTTP ``status``, metric ``reason`` and a message for the client."""

    def __init__(self, status: int, reason: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Outcome:
    logits: np.ndarray  # [size, 10]
    bits: int
    queue_us: int
    compute_us: int
    batch_size: int
    batch_end: float = 0.0  # time.monotonic() when the engine returned this request's (last) batch


@dataclass(eq=False, slots=True)
class _Pending:
    request: QueuedRequest
    images: np.ndarray
    future: asyncio.Future[Outcome]
    key: tuple[int, float, float, int]
    timer: asyncio.TimerHandle | None = None
    queue_s: float = 0.0
    compute_s: float = 0.0
    escalated: bool = False
    partial: np.ndarray | None = None  # after escalation: logits of all rows, the unsure ones to be replaced
    unsure_rows: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class _BitsSeries:
    ok: Any
    duration: Any
    compute: Any
    engine_cpu: Any
    engine_profiled: Any
    batch_size: Any
    images: Any

    @classmethod
    def of(cls, m: Metrics, bits: int) -> _BitsSeries:
        label = bits_label(bits)
        return cls(
            ok=m.requests.labels(outcome="ok", bits=label),
            duration=m.request_duration.labels(bits=label),
            compute=m.compute_duration.labels(bits=label),
            engine_cpu=m.engine_cpu.labels(bits=label),
            engine_profiled=m.engine_profiled.labels(bits=label),
            batch_size=m.batch_size.labels(bits=label),
            images=m.images.labels(bits=label),
        )


@dataclass(frozen=True, slots=True)
class _Result:
    logits: np.ndarray
    seconds: float  # Engine.run, wall
    cpu_seconds: float  # Engine.run, CPU time of the calling thread
    end: float  # time.monotonic() when it returned
    gap: float | None = None  # idle since the previous batch's end, when this batch was waiting for it


@dataclass(slots=True)
class _Hold:
    """A decision that arrivals behind ``head`` (an order key) do not change before ``until``."""

    until: float
    head: tuple[int, float, float, int]
    armed: bool = False  # the loop task has a timer for ``until``

    def covers(self, now: float, key: tuple[int, float, float, int] | None) -> bool:
        """Does the hold still stand for an arrival of ``key`` (None: no arrival, a finished batch)?"""
        return now < self.until and (key is None or key > self.head)


@dataclass(frozen=True, slots=True)
class _Job:
    batch: list[_Pending]
    bits: int
    decision: Decision
    after: float | None = None  # the end of the batch whose completion started this one (requests waited)


def _order_key(req: QueuedRequest) -> tuple[int, float, float, int]:
    return (req.priority, math.inf if req.deadline is None else req.deadline, req.arrival, req.id)


@dataclass
class SchedulerConfig:
    max_batch_size: int
    max_queue_size: int
    max_queue_delay_s: float
    workers: int
    default_bits: int
    default_priority: int
    default_timeout_s: float | None
    servable: tuple[int, ...]
    accuracy: Mapping[int, float] = field(default_factory=dict)


@dataclass(slots=True)
class _Plan:
    """What one decision did: the batch to run (if any), how long until asking again when none (None: at the
    next event), and the requests it answered without computing. Taken under the scheduler's lock on any
    thread; the refusals are settled on the event loop, which owns the futures."""

    job: _Job | None = None
    wait: float | None = None
    refused: list[tuple[_Pending, Refused]] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        engine: Runner,
        policy: Policy,
        profile: LatencyProfile,
        config: SchedulerConfig,
        metrics: Metrics,
        power_meter: PowerMeter | None = None,
        on_batch: Callable[[int, int, float, float], None] | None = None,
    ):
        self.engine = engine
        self.profile = profile
        self._latency_scale = LatencyScale()  # observed / profiled batch latency, fed by every batch
        self._answer_delay = AnswerDelay()  # from a batch's end to its answers sent, fed by the endpoints
        self._arrival_rate = ArrivalRate()  # images admitted per second, lately
        self._batch_gap = BatchGap()  # engine idle between batches while requests waited
        self.config = config
        self.metrics = metrics
        self.power_meter = power_meter
        self._on_batch = on_batch  # (bits, images, seconds, monotonic end), on the worker: energy accounting
        self._policy = policy
        # The queue and everything a decision reads or changes. The loop admits and expires requests; a
        # worker that finishes a batch decides the next one itself, without waiting for the loop: on a
        # core the loop shares, handing the decision to a busy loop and the batch back to a woken worker
        # kept the engine idle ~4 ms per batch under load (1-bit batches take 5-15 ms).
        self._lock = threading.RLock()
        self._queue: list[_Pending] = []
        self._queued_images = 0
        self._ids = itertools.count(1)
        self._inflight = 0
        self._closing = False
        self._served_accuracy: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._decided_wait: tuple[float | None] | None = None
        self._hold: _Hold | None = None  # a decision that arrivals behind its head do not change (Decision.hold)
        self._power_cache: tuple[float, PowerState] | None = None
        self._unaccounted: list[tuple[_Job, _Result]] = []  # finished batches not yet in the metrics and meters
        self._threads: list[threading.Thread] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # labelled metric children, looked up once: .labels() costs a few µs per call on the hot path
        self._bits_series: dict[int, _BitsSeries] = {}
        self._batch_counters: dict[tuple[int, str, str], Any] = {}
        self._refusal_counters: dict[tuple[int, str], tuple[Any, Any]] = {}
        # read at scrape time, not kept per request or per batch
        metrics.queue_depth.set_function(lambda: len(self._queue))
        metrics.latency_scale.set_function(lambda: self._latency_scale.value(time.monotonic()))

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._threads = [
            threading.Thread(target=self._work, name=f"apserve-engine-{i}", daemon=True)
            for i in range(self.config.workers)
        ]
        for thread in self._threads:
            thread.start()
        self._task = self._loop.create_task(self._run(), name="apserve-scheduler")

    def close(self) -> None:
        """Admit nothing more; what is queued or running is still answered."""
        self._closing = True
        self._hold = None
        self._wake.set()

    async def drain(self) -> None:
        """Wait until every admitted request has been answered, then stop the workers."""
        self.close()
        if self._task is not None:
            await self._task
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        self._threads = []

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def set_policy(self, policy: Policy) -> None:
        """Swap the policy between two decisions (under the lock, so this is atomic). Queued requests the
        new policy can never serve are answered 422 rather than left waiting forever."""
        refused = []
        with self._lock:
            self._policy = policy
            self._hold = None
            for pending in list(self._queue):
                if not self._allowed(pending.request):
                    self._remove(pending)
                    refused.append((pending, self._unservable(pending.request)))
        self._settle(refused)
        self._wake.set()

    # --- admission ------------------------------------------------------------------------------

    def _policy_bits(self) -> tuple[int, ...]:
        if isinstance(self._policy, FixedPolicy):  # a fixed policy serves nothing else: refuse, do not strand
            return (self._policy.bits,) if self._policy.bits in self.config.servable else ()
        return self.config.servable

    def _allowed(self, req: QueuedRequest) -> list[int]:
        return [b for b in self._policy_bits() if req.allows(b)]

    def _unservable(self, req: QueuedRequest) -> Refused:
        if req.strict and req.preferred_bits is not None:
            wish = f"strict precision {req.preferred_bits}"
        else:
            wish = f"bits {req.min_bits}..{req.max_bits}"
        can = ", ".join(str(b) for b in self._policy_bits())
        return Refused(422, "strict_unservable", f"{wish} cannot be served: policy {self._policy.name} runs bits {can}")

    def submit(
        self, images: np.ndarray, options: RequestOptions, received: float | None = None
    ) -> asyncio.Future[Outcome]:
        """Admit a request or raise ``Refused`` at once. The future resolves with an ``Outcome`` or ``Refused``.
        ``received``: when the request started to arrive (time.monotonic(), the loop's clock); its deadline
        counts from there, so the time spent reading and parsing it is not free."""
        try:
            with self._lock:
                pending = self._admit(images, options, received)
        except Refused as refusal:  # refused at admission: counted like a refusal from the queue
            self._count_refusal(refusal)
            raise
        if pending.request.deadline is not None:
            pending.timer = self._loop.call_at(pending.request.deadline, self._expire, pending)  # type: ignore[union-attr]
        self._kick(pending)
        return pending.future

    def _admit(self, images: np.ndarray, options: RequestOptions, received: float | None) -> _Pending:
        assert self._loop is not None, "scheduler not started"
        if self._closing:
            raise Refused(503, "shutdown", "server is shutting down; retry on another replica", retry_after=1)
        if len(self._queue) >= self.config.max_queue_size:
            raise Refused(
                429, "queue_full", f"queue is full ({self.config.max_queue_size} requests)", self._retry_after()
            )
        now = self._loop.time()
        arrival = now if received is None else min(now, received)
        hint = options.hint
        timeout = options.timeout_s if options.timeout_s is not None else self.config.default_timeout_s
        req = QueuedRequest(
            id=next(self._ids),
            arrival=arrival,
            deadline=None if timeout is None else arrival + timeout,
            min_bits=hint.min_bits,
            max_bits=hint.max_bits,
            preferred_bits=hint.preferred,
            strict=hint.strict,
            priority=options.priority or self.config.default_priority,
            size=int(images.shape[0]),
        )
        allowed = self._allowed(req)
        if not allowed:
            raise self._unservable(req)
        key = _order_key(req)
        if req.deadline is not None:
            fastest = self._latency(min(allowed, key=lambda b: self._profiled(b, req.size)), req.size)
            start = self._held_until(now, key)
            if start + fastest > req.deadline:
                waiting = f"the server holds its batches for {1e3 * (start - now):.1f} ms and " if start > now else ""
                raise Refused(
                    503,
                    "deadline",
                    f"deadline of {1e3 * (req.deadline - now):.1f} ms cannot be met: {waiting}the fastest allowed "
                    f"bits need {1e3 * fastest:.1f} ms",
                    retry_after=1,
                )
        pending = _Pending(req, images, self._loop.create_future(), key)
        self._arrival_rate.observe(now, req.size)
        self._insert(pending)
        return pending

    def _held_until(self, now: float, key: tuple[int, float, float, int]) -> float:
        """When a request of ``key`` arriving now can start at the earliest: the end of a decision's hold if it
        queues behind the held head, else now."""
        hold = self._hold
        return hold.until if hold is not None and hold.covers(now, key) else now

    def _profiled(self, bits: int, size: int) -> float:
        try:
            return self.profile.latency(bits, size)
        except KeyError:
            return 0.0

    def answer_sent(self, outcome: Outcome) -> None:
        """An endpoint finished sending ``outcome``: how long after its batch ended (encoding, the event
        loop's backlog) is time the policies must keep free before every deadline."""
        if outcome.batch_end > 0.0:
            now = time.monotonic()
            self.metrics.answer_delay.observe(now - outcome.batch_end)
            with self._lock:
                self._answer_delay.observe(now - outcome.batch_end, now)

    def _latency(self, bits: int, size: int) -> float:
        """What a batch is expected to take now: the profile, scaled as the policies scale it."""
        now = time.monotonic()
        return self._profiled(bits, size) * self._latency_scale.value(now) + self._batch_gap.value(now)

    def _retry_after(self) -> int:
        per_batch = self._latency(self.config.default_bits, self.config.max_batch_size)
        return max(1, math.ceil(per_batch * self._queued_images / self.config.max_batch_size))

    # --- the queue (under the lock) ----------------------------------------------------------

    def _insert(self, pending: _Pending) -> None:
        bisect.insort(self._queue, pending, key=lambda p: p.key)
        self._queued_images += pending.request.size

    def _remove(self, pending: _Pending) -> None:
        self._queue.remove(pending)
        self._queued_images -= pending.request.size

    # --- answers (on the loop, which owns the futures) -------------------------------------------

    def _expire(self, pending: _Pending) -> None:
        """The request's deadline timer: answered 504 if it is still queued (not if a batch holds it)."""
        with self._lock:
            if pending not in self._queue:
                return
            self._remove(pending)
        pending.timer = None
        self._refuse(pending, _timed_out(pending))
        self._wake.set()

    def _count_refusal(self, refusal: Refused) -> None:
        key = (refusal.status, refusal.reason)
        counters = self._refusal_counters.get(key)
        if counters is None:
            outcome = "timeout" if refusal.status == 504 else "rejected"
            requests = self.metrics.requests.labels(outcome=outcome, bits="none")
            reasons = self.metrics.rejections.labels(reason=refusal.reason) if outcome == "rejected" else None
            counters = self._refusal_counters[key] = (requests, reasons)
        counters[0].inc()
        if counters[1] is not None:
            counters[1].inc()

    def _refuse(self, pending: _Pending, refusal: Refused) -> None:
        self._count_refusal(refusal)
        _stop_timer(pending)
        if not pending.future.done():
            pending.future.set_exception(refusal)

    def _settle(self, refused: list[tuple[_Pending, Refused]]) -> None:
        for pending, refusal in refused:
            self._refuse(pending, refusal)

    # --- decisions ------------------------------------------------------------------------------

    def _kick(self, arrival: _Pending | None = None) -> None:
        """Start batches right away while a worker is free, rather than in the loop task one iteration
        later. Called after every change that may allow a batch (an arrival, a finished batch), so the
        loop task is woken only to arm a timer for a wait the policy decided, or to wind down. While a
        decision holds (``Decision.hold``), an arrival behind its head or a finished batch (whose worker
        took that decision) asks nothing: the timer at the hold's end does."""
        assert self._loop is not None
        while self._queue and self._inflight < self.config.workers:
            hold = self._hold
            now = self._loop.time()
            if hold is not None and hold.covers(now, None if arrival is None else arrival.key):
                if not hold.armed:  # decided by a worker: the loop task has no timer for it yet
                    hold.armed = True
                    self._decided_wait = (hold.until - now,)
                    self._wake.set()
                return
            wait = self._dispatch()
            if wait != 0.0:  # no batch: hand the decided wait to the loop task, which arms the timer
                self._decided_wait = (wait,)
                if self._hold is not None:
                    self._hold.armed = True
                self._wake.set()
                return
            self._decided_wait = None

    async def _run(self) -> None:
        assert self._loop is not None
        while True:
            self._wake.clear()
            if self._closing and not self._queue and self._inflight == 0:
                return
            wait: float | None = None
            if self._decided_wait is not None:  # _kick has just asked the policy: do not ask again
                (wait,), self._decided_wait = self._decided_wait, None
            elif self._queue and self._inflight < self.config.workers:
                wait = self._dispatch()
                if wait == 0.0:
                    continue
                if self._hold is not None:
                    self._hold.armed = True  # the timer below
            timer = self._loop.call_later(wait, self._wake.set) if wait is not None else None
            await self._wake.wait()
            if timer is not None:
                timer.cancel()

    def _snapshot(self, now: float) -> Snapshot:
        return Snapshot(
            now=now,
            queue=tuple(p.request for p in self._queue),
            profile=self.profile,
            latency_scale=self._latency_scale.value(now),
            answer_delay_s=self._answer_delay.value(now),
            arrival_rate=self._arrival_rate.value(now),
            batch_gap_s=self._batch_gap.value(now),
            accuracy=self.config.accuracy,
            max_batch_size=self.config.max_batch_size,
            default_bits=self.config.default_bits,
            power=self._power_state(now),
        )

    def _power_state(self, now: float) -> PowerState | None:
        """The meter's state, re-read at most every POWER_REFRESH_S: a RAPL read costs tens of µs and the
        budget's window is a second or more, so a few ms of staleness change nothing."""
        if self.power_meter is None:
            return None
        cached = self._power_cache
        if cached is None or now - cached[0] >= POWER_REFRESH_S:
            cached = self._power_cache = (now, self.power_meter.state(now))
        return cached[1]

    def _dispatch(self) -> float | None:
        """On the loop: ask the policy and start a batch. Returns 0 when a batch started (or the queue
        changed and the policy should be asked again), else how long to wait (None: until the next arrival,
        finished batch or timer)."""
        assert self._loop is not None
        with self._lock:
            plan = self._decide(self._loop.time(), after=None)
        self._settle(plan.refused)
        if plan.job is not None:
            self._jobs.put(plan.job)
        return plan.wait

    def _decide(self, now: float, after: float | None) -> _Plan:
        """Under the lock, on any thread: one decision of the policy on the queue of now. ``after``: the end
        of the batch whose completion this decision follows (its batch waited for that one)."""
        plan = _Plan()
        if not self._queue or self._inflight >= self.config.workers:
            return plan
        self._account_finished()  # the policy sees every finished batch's latency and energy
        for pending in [p for p in self._queue if p.request.deadline is not None and p.request.deadline <= now]:
            self._remove(pending)  # its timer is due but has not run yet: never start stale work
            plan.refused.append((pending, _timed_out(pending)))
        if not self._queue:
            return plan
        decision = self._policy.decide(self._snapshot(now))
        self._hold = None
        by_id = {p.request.id: p for p in self._queue}
        for rid in decision.reject:
            if rid in by_id:
                pending = by_id.pop(rid)
                self._remove(pending)
                reason = decision.reason or "its deadline cannot be met"
                plan.refused.append(
                    (pending, Refused(503, "deadline", f"refused before compute: {reason}", retry_after=1))
                )
        if decision.bits is None:
            if self._closing and self._queue and self._inflight == 0 and decision.wait_until is None:
                for pending in list(self._queue):  # the policy will serve nothing more and no one will come
                    self._remove(pending)
                    plan.refused.append(
                        (pending, Refused(503, "shutdown", "server shut down before serving this request"))
                    )
                plan.wait = 0.0
            elif decision.wait_until is not None:
                plan.wait = max(0.0, decision.wait_until - now)
                if decision.hold and self._queue and not self._closing:
                    self._hold = _Hold(decision.wait_until, self._queue[0].key)
            return plan
        bits = decision.bits
        chosen = [by_id[i] for i in decision.requests if i in by_id and by_id[i].request.allows(bits)]
        if not chosen:
            log.warning("policy %s chose bits %s but no queued request that allows it", self._policy.name, bits)
            return plan
        images = sum(p.request.size for p in chosen)
        if self.config.max_queue_delay_s > 0 and images < self.config.max_batch_size and not self._closing:
            ready_at = min(p.request.arrival for p in chosen) + self.config.max_queue_delay_s
            if now < ready_at:
                plan.wait = ready_at - now
                return plan
        for pending in chosen:
            self._remove(pending)
            pending.queue_s += now - pending.request.arrival if not pending.escalated else 0.0
            self.metrics.queue_duration.observe(now - pending.request.arrival)
        self._inflight += 1
        plan.job = _Job(chosen, bits, decision, after)
        plan.wait = 0.0
        return plan

    # --- workers --------------------------------------------------------------------------------

    def _work(self) -> None:
        """A worker thread: run a batch; hand its answers to the event loop; account for it and decide the
        next one; go on with that batch at once if there is one."""
        assert self._loop is not None
        yield_to_event_loop()
        job = self._jobs.get()
        while job is not None:
            started, cpu_started = time.monotonic(), time.thread_time()
            result: _Result | BaseException
            try:
                result = _compute(self.engine, [p.images for p in job.batch], job.bits)
                if job.after is not None:
                    result = replace(result, gap=started - job.after)
            except Exception as exc:
                result = exc
            following = self._after_batch(job, result)
            engine_cpu = result.cpu_seconds if isinstance(result, _Result) else 0.0
            self.metrics.worker_cpu.inc(max(0.0, time.thread_time() - cpu_started - engine_cpu))
            job = following if following is not None else self._jobs.get()

    def _after_batch(self, job: _Job, result: _Result | BaseException) -> _Job | None:
        """On the worker, under the lock. With requests waiting: account for the batch (what the policy must
        see: its latency and energy), decide the next one and hand the answers to the loop. With none: hand
        the answers over first and leave the accounting to the loop after they are written (at low load it
        would otherwise hold the GIL the loop needs to answer); every decision and metrics read does any
        accounting left first."""
        assert self._loop is not None
        with self._lock:
            self._inflight -= 1
            rows: list[np.ndarray] = []
            escalated: set[int] = set()
            after = None
            if not isinstance(result, BaseException):
                ends = list(itertools.accumulate(p.request.size for p in job.batch))
                rows = [result.logits[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
                try:
                    escalated = self._escalate_unsure(job, result, rows)
                except Exception:  # our bug: answer what the batch computed rather than lose the worker
                    log.exception("escalating a batch's unsure rows failed")
                after = result.end
                self._unaccounted.append((job, result))
            try:
                plan = self._decide(time.monotonic(), after)  # at once when nothing is queued
            except Exception:  # the loop asks again (and reports) when it handles this batch
                log.exception("policy %s failed deciding after a batch", self._policy.name)
                plan = _Plan()
        self._loop.call_soon_threadsafe(self._finish, job, result, rows, escalated)
        if plan.refused:
            self._loop.call_soon_threadsafe(self._settle, plan.refused)
        return plan.job

    def account_finished(self) -> None:
        """Account for every finished batch (a metrics read then sees its energy and latency)."""
        with self._lock:
            self._account_finished()

    def _account_finished(self) -> None:
        """Under the lock: the accounting of finished batches not yet done."""
        batches, self._unaccounted = self._unaccounted, []
        for job, result in batches:
            self._account(job, result)

    def _account(self, job: _Job, result: _Result) -> None:
        bits, images = job.bits, int(result.logits.shape[0])
        series = self._series(bits)
        self._batch_counter(bits, job.decision.reason).inc()
        series.compute.observe(result.seconds)
        profiled = self._profiled(bits, images)
        series.engine_cpu.inc(result.cpu_seconds)
        series.engine_profiled.inc(profiled)
        self._latency_scale.observe(result.seconds, profiled, result.end)
        if result.gap is not None:
            self.metrics.batch_gap.observe(result.gap)
            self._batch_gap.observe(result.gap, result.end)
        series.batch_size.observe(images)
        series.images.inc(images)
        self._track_accuracy(bits, images)
        if self._on_batch is not None:
            try:
                self._on_batch(bits, images, result.seconds, result.end)
            except Exception:
                log.exception("power meter failed to record a batch")

    def _escalate_unsure(self, job: _Job, result: _Result, rows: list[np.ndarray]) -> set[int]:
        """A cascade decision: re-queue each request's unsure rows as a strict request at ``escalate_to``,
        keeping arrival, deadline (and its timer) and priority. Returns the ids re-queued."""
        below, to = job.decision.escalate_below, job.decision.escalate_to
        if below is None or to is None or to == job.bits:
            return set()
        escalated: set[int] = set()
        for pending, own in zip(job.batch, rows, strict=True):
            if pending.escalated or not pending.request.allows(to):
                continue
            unsure = _top_probability(own) < below
            if not unsure.any():
                continue
            pending.compute_s += result.seconds
            pending.partial = own.copy()
            pending.unsure_rows = np.flatnonzero(unsure)
            pending.images = pending.images[unsure]
            req = replace(pending.request, preferred_bits=to, strict=True, size=int(unsure.sum()))
            pending.request = req
            pending.key = _order_key(req)
            pending.escalated = True
            self._insert(pending)
            escalated.add(req.id)
        return escalated

    def _finish(
        self,
        job: _Job,
        result: _Result | BaseException,
        rows: list[np.ndarray],
        escalated: set[int],
    ) -> None:
        """On the event loop: answer the batch's requests (but the ones re-queued for escalation), then
        start a batch if the worker did not."""
        assert self._loop is not None
        try:
            self._answer(job, result, rows, escalated)
            self._loop.call_soon(self.account_finished)  # behind the answers just released: they are written first
        finally:
            self._kick()
            if self._closing:  # the loop task ends once nothing is queued or running
                self._wake.set()

    def _answer(self, job: _Job, result: _Result | BaseException, rows: list[np.ndarray], escalated: set[int]) -> None:
        batch, bits = job.batch, job.bits
        if isinstance(result, BaseException):  # an engine failure is our bug: log it, answer 500, keep serving
            log.error("engine failed at %s bits on a batch of %d requests", bits, len(batch), exc_info=result)
            for pending in batch:
                self.metrics.requests.labels(outcome="error", bits=bits_label(bits)).inc()
                _stop_timer(pending)
                if not pending.future.done():
                    pending.future.set_exception(Refused(500, "error", f"engine failed: {result}"))
            return
        images, seconds, end = int(result.logits.shape[0]), result.seconds, result.end
        series = self._series(bits)
        done = self._loop.time() if self._loop is not None else time.monotonic()
        answered = 0
        for pending, own in zip(batch, rows, strict=True):
            if pending.request.id in escalated:
                continue
            answered += 1
            pending.compute_s += seconds
            if pending.partial is not None and pending.unsure_rows is not None:
                merged = pending.partial
                merged[pending.unsure_rows] = own
                own = merged
            req = pending.request
            series.duration.observe(done - req.arrival)
            if req.deadline is not None and done > req.deadline:
                self.metrics.slo_violations.inc()
            _stop_timer(pending)
            if not pending.future.done():
                pending.future.set_result(
                    Outcome(own, bits, int(1e6 * pending.queue_s), int(1e6 * pending.compute_s), images, end)
                )
        series.ok.inc(answered)

    def _series(self, bits: int) -> _BitsSeries:
        series = self._bits_series.get(bits)
        if series is None:
            series = self._bits_series[bits] = _BitsSeries.of(self.metrics, bits)
        return series

    def _batch_counter(self, bits: int, reason: str) -> Any:
        key = (bits, self._policy.name, reason or "none")
        counter = self._batch_counters.get(key)
        if counter is None:
            counter = self.metrics.batches.labels(bits=bits_label(bits), policy=key[1], reason=key[2])
            self._batch_counters[key] = counter
        return counter

    def _track_accuracy(self, bits: int, images: int) -> None:
        accuracy = self.config.accuracy.get(bits)
        if accuracy is None:
            return
        weight = min(1.0, images / 500.0)  # exponential average over roughly the last 500 images
        prev = self._served_accuracy
        self._served_accuracy = accuracy if prev is None else prev + weight * (accuracy - prev)
        self.metrics.served_accuracy.set(self._served_accuracy)


def _timed_out(pending: _Pending) -> Refused:
    waited = 1e3 * (pending.request.deadline or 0.0) - 1e3 * pending.request.arrival
    return Refused(504, "timeout", f"deadline passed after {waited:.1f} ms in the queue")


def _stop_timer(pending: _Pending) -> None:
    if pending.timer is not None:
        pending.timer.cancel()
        pending.timer = None


def _top_probability(logits: np.ndarray) -> np.ndarray:
    """The top softmax probability of each row."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    return np.asarray(p.max(axis=1) / p.sum(axis=1))


def yield_to_event_loop() -> None:
    """Run the calling (worker) thread below the event loop: on a core shared by both, parsing a request
    or sending an answer must not wait for a batch to finish (under SCHED_FIFO it would wait the whole
    batch; under the default scheduler half of it). Lowering one's own priority needs no privilege; where
    the OS refuses, the thread runs as it is."""
    tid = threading.get_native_id()
    try:
        policy = os.sched_getscheduler(tid)
        if policy in (os.SCHED_FIFO, os.SCHED_RR):
            priority = os.sched_getparam(tid).sched_priority
            if priority > 1:
                os.sched_setscheduler(tid, policy, os.sched_param(priority - 1))
        else:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 5))
    except (AttributeError, OSError) as exc:  # not Linux, or a sandbox that forbids it
        log.debug("worker thread keeps its priority: %s", exc)


def _compute(engine: Runner, arrays: list[np.ndarray], bits: int) -> _Result:
    """On a worker thread: join the requests' images into one batch and run it."""
    if len(arrays) == 1:
        batch = arrays[0]
    elif all(a.dtype == np.uint8 for a in arrays):
        batch = np.concatenate(arrays)
    else:  # mixed datatypes: the engine's float input is pixels / 255
        batch = np.concatenate([a.astype(np.float32) / np.float32(255.0) if a.dtype == np.uint8 else a for a in arrays])
    start, cpu_start = time.perf_counter(), time.thread_time()
    logits = engine.run(batch.reshape(-1, 1, 28, 28), bits)
    seconds, cpu_seconds, end = time.perf_counter() - start, time.thread_time() - cpu_start, time.monotonic()
    return _Result(np.asarray(logits, dtype=np.float32), seconds, cpu_seconds, end)
