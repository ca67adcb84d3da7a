"""`slo`: SlackFit-style precision choice — keep every deadline, then be as accurate as possible.

SuperServe's SlackFit takes the slack of the most urgent request and, among (sub-network, batch) choices
whose profiled latency fits it, the largest batch. We switch bits instead of sub-networks. The rule, per
decision (queue already in priority, then earliest-deadline order):

1. Refuse early: plan the whole queue at each request's cheapest bits, in batches as full as the
   deadlines allow (``Planner.late_in_plan``). A request that misses its deadline less ``margin_ms`` even
   in that plan is refused now, not served late: serving it would only make the requests behind it late
   too. The margin counts here as everywhere (since session 5, as in `power`): it is the part of the
   client's latency the server cannot see, so an answer inside it reaches the client late all the same,
   and on a VM whose speed swings, serving those at the brink is what let a slow second cascade.
   In overload (step 1 refused someone), the batches must also stay efficient: while a batch of the
   cheapest bits' efficient size (``Planner.efficient_batch``: the smallest batch within 15 % of the best
   time per image, 8 images on the bundled profile; the engine's idle time before each batch,
   ``Snapshot.batch_gap_s``, counts as a cost of the batch, so a server with a gap batches more) is
   queued, a head request whose deadline cannot wait for such a batch is refused too. Serving it would take a batch of one or two, and in a sustained
   overload those small batches are what loses the throughput the cheapest bits have (simulated spike,
   the bundled profile: batches of 2.4 images on average during the peak, 89.8 % attainment; with this
   rule, see docs/RESULTS.md).
2. The head (most urgent request) fixes the candidate bits (``Planner.candidates``: Pareto bits in its
   bounds, its hint, strict hints exactly). For each bits, most accurate first, the batch is the longest
   queue-order run of requests allowing those bits whose predicted latency ends before the earliest
   deadline in it (the slack), up to ``max_batch_size``.
3. Take the first (most accurate) bits whose batch (a) holds the head and (b) leaves the rest of the queue
   on time: the plan of step 1 for the remaining requests, starting when this batch ends plus a reserve,
   has no late request. The reserve is one full batch at the cheapest bits plus the cheapest-bits time of
   the images expected to arrive while this batch runs (``Snapshot.arrival_rate``). Inside those bits
   take the largest fitting batch.
   Why accuracy first and not SlackFit's largest batch first: on this model all bits share one set of
   weights and the batch curve is flat past 8, so a bigger batch buys little once the queue is on time;
   (b) is what protects throughput — the moment the queue cannot absorb the more accurate choice, it
   is skipped, which is exactly when SlackFit's largest-batch rule would have moved down.
4. Nothing passes: the head's cheapest bits, the fullest batch (overload; step 1 keeps it honest).
5. Latest-start timer: with ``hold_ms`` > 0, a queue shorter than ``target_batch`` images may wait for more
   arrivals, but never past the oldest request's arrival + ``hold_ms`` nor past the latest start that
   still meets the batch's deadline at a full ``target_batch`` (``Decision.wait_until``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from policies.base import IDLE, Decision, QueuedRequest, Snapshot
from policies.planning import Planner, take_fitting

# accept(bits, images) -> may a batch of that many images run at those bits now (e.g. the power cap)
Accept = Callable[[int, int], bool]


@dataclass(frozen=True)
class SloPolicy:
    target_batch: int = 1
    hold_ms: float = 0.0
    margin_ms: float = 2.0  # held back from every deadline: what the profile does not see (HTTP, jitter)
    name: str = "slo"

    def decide(self, snapshot: Snapshot) -> Decision:
        return self.decide_within(snapshot, None)

    def decide_within(self, snapshot: Snapshot, accept: Accept | None, capped: Decision | None = None) -> Decision:
        """The slo rule restricted to batches ``accept`` allows. When nothing at all is allowed, returns
        ``capped`` (with this decision's refusals added)."""
        if not snapshot.queue:
            return IDLE
        planner = Planner(snapshot, self.margin_ms / 1000.0)
        now = snapshot.now
        late = planner.late_in_plan(snapshot.queue, now)
        late_ids = {r.id for r in late}
        reject = tuple(r.id for r in late)
        queue = [r for r in snapshot.queue if r.id not in late_ids]
        if late:
            shed = _shed_for_efficiency(planner, queue, now)
            if shed:
                reject += tuple(r.id for r in shed)
                queue = queue[len(shed) :]
        if not queue:
            return Decision(bits=None, reason="all queued requests hopeless", reject=reject)

        head = queue[0]
        cheapest = planner.cheapest(head)
        # keep in reserve behind every accurate choice one full batch at the cheapest bits (a queue run to
        # the brink of its deadlines could then only be served in small, inefficient batches) and the
        # cheapest-bits time of the images expected to arrive while the choice runs: the plan sees only the
        # queue of now, and under a spike the arrivals during a long accurate batch are what tips it over
        most = snapshot.max_batch_size
        reserve = planner.latency(cheapest, most) if cheapest is not None else 0.0
        per_image = reserve / most if most > 0 else 0.0
        chosen: tuple[int, list[QueuedRequest], str] | None = None
        for bits in planner.candidates(head):
            batch = take_fitting(planner, queue, bits, accept)
            n = planner.fitting_prefix(batch, bits, now)
            if n == 0 or batch[0].id != head.id:
                continue
            batch = batch[:n]
            ids = {r.id for r in batch}
            end = now + planner.latency(bits, sum(r.size for r in batch))
            rest = [r for r in queue if r.id not in ids]
            arriving = per_image * snapshot.arrival_rate * (end - now)
            if bits == cheapest or not planner.late_in_plan(rest, end + reserve + arriving):
                chosen = (bits, batch, "slack" if bits != cheapest else "cheapest")
                break
        if chosen is None and cheapest is not None:  # overload: the cheapest bits, as full as allowed
            batch = take_fitting(planner, queue, cheapest, accept)
            if batch and batch[0].id == head.id:
                n = planner.fitting_prefix(batch, cheapest, now)
                chosen = (cheapest, batch[: max(n, 1)], "overload")
        if chosen is None:
            base = capped or Decision(bits=None, reason="no bits allowed for the head request")
            return Decision(bits=None, reason=base.reason, reject=reject + base.reject, wait_until=base.wait_until)
        bits, batch, reason = chosen

        images = sum(r.size for r in queue)
        if self.hold_ms > 0 and reason == "slack" and images < self.target_batch:
            oldest = min(r.arrival for r in queue)
            deadlines = [r.deadline for r in batch if r.deadline is not None]
            latest = oldest + self.hold_ms / 1000.0
            if deadlines:
                full = planner.latency(bits, self.target_batch)
                latest = min(latest, min(deadlines) - planner.margin_s - full)
            if now < latest:
                return Decision(bits=None, reason="hold for a fuller batch", reject=reject, wait_until=latest)
        return Decision(bits=bits, requests=tuple(r.id for r in batch), reason=reason, reject=reject)


def _shed_for_efficiency(planner: Planner, queue: list[QueuedRequest], now: float) -> list[QueuedRequest]:
    """The leading requests to refuse so that the next batch at the cheapest bits can be efficient: each
    head whose deadline falls before an efficient batch of the requests allowing those bits would end,
    while such a batch is queued behind it."""
    shed: list[QueuedRequest] = []
    for head in queue:
        bits = planner.cheapest(head)
        if bits is None or head.deadline is None:
            break
        size = planner.efficient_batch(bits)
        rest = queue[len(shed) :]
        if sum(r.size for r in planner.fill(rest, bits, size)) < size:
            break  # no efficient batch queued: serve what there is
        if now + planner.latency(bits, size) <= head.deadline - planner.margin_s:
            break
        shed.append(head)
    return shed
