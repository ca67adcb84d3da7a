"""`queue`: bits from the queue depth (images waiting), with hysteresis.

``levels`` is a list of ``[depth, bits]`` with increasing depths starting at 0: at depth >= d the policy
runs at most those bits. It steps down (cheaper) as soon as the depth reaches the next threshold, and
steps back up only once the depth has fallen ``hysteresis`` images below the threshold that moved it
down, so a queue hovering around a threshold does not flap. The current level is the one piece of state a
decider keeps: hysteresis is memory by definition.

Bits of a level that are not on the Pareto front are replaced by the most accurate Pareto bits no slower
than them; a request whose bounds exclude the level's bits gets its own most accurate candidate no slower
than the level's (or its cheapest).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.base import IDLE, Decision, Snapshot
from policies.planning import Planner

DEFAULT_LEVELS = ((0, 8), (32, 2), (64, 1))


@dataclass
class QueueDepthPolicy:
    levels: tuple[tuple[int, int], ...] = DEFAULT_LEVELS
    hysteresis: int = 8
    name: str = "queue"
    _level: int = field(default=0, repr=False)

    def level_for(self, depth: int) -> int:
        level = self._level
        while level + 1 < len(self.levels) and depth >= self.levels[level + 1][0]:
            level += 1
        while level > 0 and depth < self.levels[level][0] - self.hysteresis:
            level -= 1
        self._level = level
        return level

    def decide(self, snapshot: Snapshot) -> Decision:
        if not snapshot.queue:
            self.level_for(0)
            return IDLE
        planner = Planner(snapshot)
        depth = sum(r.size for r in snapshot.queue)
        level = self.level_for(depth)
        level_bits = self.levels[level][1]
        ceiling = planner.latency(level_bits, 1) if level_bits in planner.profiled else float("inf")
        head = snapshot.queue[0]
        fitting = [b for b in planner.candidates(head) if planner.latency(b, 1) <= ceiling]
        bits = fitting[0] if fitting else planner.cheapest(head)
        if bits is None:
            return Decision(bits=None, reason="no bits allowed for the head request")
        batch = planner.fill(snapshot.queue, bits)
        return Decision(bits=bits, requests=tuple(r.id for r in batch), reason=f"depth {depth} level {level}")
