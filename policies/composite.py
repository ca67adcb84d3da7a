"""`composite`: hints and strict requests constrain, the power budget caps, `slo` chooses inside.

Hints and strict requests constrain through ``Planner.candidates`` (as in every decider); with a
``budget_w`` the power cap removes every (bits, batch) whose predicted energy does not fit the window's
remaining energy, and every bits but the head's cheapest that the budget could not sustain at the
arrival rate (``PowerCap.sustainable``, as in `power`); the slo rule then picks among what is left. When
the cap leaves nothing, the decision waits for the budget to refill (refusing hopeless requests meanwhile).
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.base import IDLE, Decision, Snapshot
from policies.planning import Planner
from policies.power import DEFAULT_WATTS_PER_CORE, PowerCap
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
        planner = Planner(snapshot)
        cap = PowerCap.of(snapshot, self.budget_w, self.watts_per_core, planner)
        head = snapshot.queue[0]
        cheapest = planner.cheapest(head)
        waiting = (
            cap.wait(snapshot.now, cheapest, head.size)
            if cheapest is not None
            else Decision(bits=None, reason="no bits allowed for the head request")
        )
        if cheapest is not None and not cap.accept(cheapest, head.size):  # exhausted: only refusals to decide
            late = Planner(snapshot, self.slo.margin_ms / 1000.0).late_in_plan(snapshot.queue, snapshot.now)
            return Decision(
                bits=None, reason=waiting.reason, reject=tuple(r.id for r in late), wait_until=waiting.wait_until
            )
        unsustainable = {
            b
            for b in planner.candidates(head)
            if b != cheapest and not cap.sustainable(b, snapshot.arrival_rate, snapshot.max_batch_size)
        }

        def fits(bits: int, images: int) -> bool:
            return bits not in unsustainable and cap.accept(bits, images)

        return self.slo.decide_within(snapshot, fits, capped=waiting)
