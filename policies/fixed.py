"""`fixed-K`: every batch runs at K bits; requests that do not allow K are left for nothing else to take."""

from __future__ import annotations

from dataclasses import dataclass

from policies.base import IDLE, Decision, Snapshot
from policies.batching import take_batch


@dataclass(frozen=True)
class FixedPolicy:
    bits: int

    @property
    def name(self) -> str:
        return f"fixed-{self.bits}"

    def decide(self, snapshot: Snapshot) -> Decision:
        if not snapshot.queue:
            return IDLE
        ids = take_batch(snapshot.queue, self.bits, snapshot.max_batch_size)
        if not ids:
            return Decision(bits=None, reason="no queued request allows the fixed bits")
        return Decision(bits=self.bits, requests=ids, reason="fixed")
