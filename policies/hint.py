"""`hint`: the most urgent request's precision hint, else the default bits; the batch is filled with the
queued requests (in queue order) that allow those bits."""

from __future__ import annotations

from dataclasses import dataclass

from policies.base import IDLE, Decision, Snapshot
from policies.batching import take_batch


@dataclass(frozen=True)
class HintPolicy:
    name: str = "hint"

    def decide(self, snapshot: Snapshot) -> Decision:
        if not snapshot.queue:
            return IDLE
        head = snapshot.queue[0]
        if head.preferred_bits is not None and head.allows(head.preferred_bits):
            bits, reason = head.preferred_bits, "hint"
        elif head.allows(snapshot.default_bits):
            bits, reason = snapshot.default_bits, "default"
        else:  # the default is outside the request's bounds: the allowed bits closest to it
            bits = min(head.allowed, key=lambda b: abs(b - snapshot.default_bits))
            reason = "default-clamped"
        return Decision(bits=bits, requests=take_batch(snapshot.queue, bits, snapshot.max_batch_size), reason=reason)
