"""`composite`: hints and strict requests constrain, the power budget caps, `slo` chooses inside.

Hints and strict requests constrain through ``Planner.candidates`` (as in every decider); with a
``budget_w`` the power cap removes every (bits, batch) whose predicted energy does not fit the window's
remaining energy, and every bits but the head's cheapest that the budget could not sustain at the
arrival rate (``PowerCap.sustainable``, as in `power`); the slo rule then picks among what is left. When
the cap leaves nothing, the decision waits for the budget to refill (refusing hopeless requests meanwhile).
As in `power` (since session 12), the wait is for an efficient batch at the head's cheapest bits when the
head can wait for one, in budget overload heads that cannot wait for one are refused, and the wait holds
(``Decision.hold``): the requests late in the plan from its end are refused with it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from policies.base import IDLE, Decision, Snapshot
from policies.planning import Planner
from policies.power import DEFAULT_WATTS_PER_CORE, PowerCap, budget_target, rushed_for_efficiency
from policies.slo import SloPolicy


@dataclass(frozen=True)
class CompositePolicy:
    slo: SloPolicy = SloPolicy()
    budget_w: float | None = None
    watts_per_core: float = DEFAULT_WATTS_PER_CORE
    name: str = "composite"

    def decide(self, snapshot: Snapshot) -> Decision:
        if not snapshot.queue:
            return IDLE
        if self.budget_w is None:
            return self.slo.decide(snapshot)
        planner = Planner(snapshot, self.slo.margin_ms / 1000.0)
        cap = PowerCap.of(snapshot, self.budget_w, self.watts_per_core, planner)
        rushed = rushed_for_efficiency(planner, cap, snapshot.queue, snapshot)
        if rushed:  # as in power: the budget runs short, not the queue
            snapshot = replace(snapshot, queue=snapshot.queue[len(rushed) :])
            if not snapshot.queue:
                return Decision(bits=None, reason="queued requests cannot wait for an efficient batch", reject=rushed)
            planner = Planner(snapshot, self.slo.margin_ms / 1000.0)
            cap = PowerCap.of(snapshot, self.budget_w, self.watts_per_core, planner)
        head = snapshot.queue[0]
        cheapest = planner.cheapest(head)
        if cheapest is None:
            return Decision(bits=None, reason="no bits allowed for the head request", reject=rushed)
        target = budget_target(planner, cap, snapshot.queue, snapshot.now, snapshot.max_batch_size)
        waiting = cap.wait(snapshot.now, cheapest, target)
        if not cap.accept(cheapest, target):  # exhausted, or short of an efficient batch: only refusals to decide
            # the wait holds as power's does (Decision.hold), so the plan is made from its end
            start = waiting.wait_until if waiting.wait_until is not None else snapshot.now
            late = planner.late_in_plan(snapshot.queue, start)
            reject = rushed + tuple(r.id for r in late)
            return replace(waiting, reject=reject)
        unsustainable = {
            b
            for b in planner.candidates(head)
            if b != cheapest and not cap.sustainable(b, snapshot.arrival_rate, snapshot.max_batch_size)
        }

        def fits(bits: int, images: int) -> bool:
            return bits not in unsustainable and cap.accept(bits, images)

        decision = self.slo.decide_within(snapshot, fits, capped=waiting)
        return replace(decision, reject=rushed + decision.reject) if rushed else decision
