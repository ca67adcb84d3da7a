"""`cascade`: run a batch at low bits, re-run at high bits only the rows the low bits are unsure of.

The scheduler runs the batch at ``low_bits``; rows whose top softmax probability is below ``threshold``
(``Decision.escalate_below``) run again at ``high_bits`` (``Decision.escalate_to``) and answer with
those. ``calibrate`` picks the threshold on the validation split: the smallest one (fewest re-runs) whose
cascade accuracy reaches a target. Requests with a hint or bounds excluding the cascade's bits are served
as `hint` would, at ``high_bits`` by default.

The cascade is there to save energy, so with ``efficient_batches`` (the default) it waits for an
efficient batch (``Planner.efficient_batch``: time per image within 1.15 x of the best batch's) while the
head can still finish by its deadline less ``margin_ms`` after the wait, even if every row of the batch
escalates: the 1-bit kernels' cost per call is fixed in good part, and a batch of one costs about twice the
time per image of a full one. Arrivals end the wait as soon as they fill the batch. ``margin_ms`` is the
same as slo's: a wait planned to the last millisecond loses its request to the event loop's jitter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from policies.base import IDLE, Decision, QueuedRequest, Snapshot
from policies.hint import HintPolicy
from policies.planning import Planner


@dataclass(frozen=True)
class CascadePolicy:
    threshold: float
    low_bits: int = 1
    high_bits: int = 8
    efficient_batches: bool = True
    margin_ms: float = 2.0  # held back from the head's deadline when waiting, as slo's
    name: str = "cascade"

    def decide(self, snapshot: Snapshot) -> Decision:
        if not snapshot.queue:
            return IDLE
        head = snapshot.queue[0]
        if self._cascades(head):
            images = 0
            ids: list[int] = []
            for req in snapshot.queue:
                if not self._cascades(req):
                    continue
                if ids and images + req.size > snapshot.max_batch_size:
                    break
                ids.append(req.id)
                images += req.size
            wait = self._wait_for_efficient_batch(snapshot, head, images)
            if wait is not None:
                return wait
            return Decision(
                bits=self.low_bits,
                requests=tuple(ids),
                reason="cascade",
                escalate_below=self.threshold,
                escalate_to=self.high_bits,
            )
        decision = HintPolicy().decide(dataclasses.replace(snapshot, default_bits=self.high_bits))
        return dataclasses.replace(decision, reason=f"cascade bypass ({decision.reason})")

    def _wait_for_efficient_batch(self, snapshot: Snapshot, head: QueuedRequest, images: int) -> Decision | None:
        """Wait until the head's latest start, or None to run now: the batch is efficient already, the
        head has no deadline, or its latest start has come. The latest start leaves time for an efficient
        batch at low bits and all of it again at high bits, and the margin."""
        if not self.efficient_batches or head.deadline is None:
            return None
        planner = Planner(snapshot, self.margin_ms / 1000.0)
        target = planner.efficient_batch(self.low_bits)
        if images >= target:
            return None
        run = planner.latency(self.low_bits, target) + planner.latency(self.high_bits, target)
        latest = head.deadline - planner.margin_s - run
        if snapshot.now >= latest:
            return None
        return Decision(bits=None, reason="cascade: waiting for an efficient batch", wait_until=latest)

    def _cascades(self, req: QueuedRequest) -> bool:
        return req.preferred_bits is None and req.allows(self.low_bits) and req.allows(self.high_bits)


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` found on the validation split; the simulator uses the fractions."""

    low_bits: int
    high_bits: int
    threshold: float
    target_accuracy: float
    accuracy: float  # cascade accuracy at the threshold
    escalated_fraction: float
    accuracy_kept: float  # accuracy of the rows answered at low bits
    accuracy_escalated: float  # accuracy of the re-run rows (at high bits)
    accuracy_low: float
    accuracy_high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def _softmax_top(outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top probability, argmax) per row of logits or probabilities."""
    x = np.asarray(outputs, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected outputs [N, classes], got shape {x.shape}")
    is_prob = np.all(x >= 0) and np.allclose(x.sum(axis=1), 1.0, atol=1e-4)
    if not is_prob:
        x = np.exp(x - x.max(axis=1, keepdims=True))
        x /= x.sum(axis=1, keepdims=True)
    return x.max(axis=1), x.argmax(axis=1)


def calibrate(
    low_outputs: np.ndarray,
    high_outputs: np.ndarray,
    labels: np.ndarray,
    target_accuracy: float,
    low_bits: int = 1,
    high_bits: int = 8,
) -> Calibration:
    """Smallest threshold on the low-bits top softmax probability whose cascade accuracy reaches
    ``target_accuracy`` on these (validation) rows. ``*_outputs`` are logits or softmax [N, classes].
    Unreachable targets (above the best cascade accuracy) raise ValueError naming the best one."""
    labels = np.asarray(labels)
    top_low, pred_low = _softmax_top(low_outputs)
    _, pred_high = _softmax_top(high_outputs)
    n = len(labels)
    if not (len(top_low) == len(pred_high) == n) or n == 0:
        raise ValueError(f"need as many non-zero rows of outputs as labels: {len(top_low)}, {len(pred_high)}, {n}")
    if not 0.0 < target_accuracy <= 1.0:
        raise ValueError(f"target_accuracy must be in (0, 1], got {target_accuracy}")
    right_low = pred_low == labels
    right_high = pred_high == labels
    order = np.argsort(top_low, kind="stable")
    conf = top_low[order]
    # escalating the m least confident rows: correct = high on the first m + low on the rest
    correct = np.concatenate(([0], np.cumsum(right_high[order]))) + np.concatenate(
        (np.cumsum(right_low[order][::-1])[::-1], [0])
    )
    # a threshold escalates rows with conf < t, so only m at the end of a run of equal confidences is possible
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = conf[1:] > conf[:-1]
    ok = np.flatnonzero(valid & (correct >= target_accuracy * n - 1e-9))
    if len(ok) == 0:
        best = correct[valid].max() / n
        raise ValueError(f"target accuracy {target_accuracy:.4f} unreachable; the best cascade reaches {best:.4f}")
    m = int(ok[0])
    threshold = 0.0 if m == 0 else (1.0 if m == n else float((conf[m - 1] + conf[m]) / 2))
    escalated = np.zeros(n, dtype=bool)
    escalated[order[:m]] = True
    kept = ~escalated
    return Calibration(
        low_bits=low_bits,
        high_bits=high_bits,
        threshold=threshold,
        target_accuracy=target_accuracy,
        accuracy=float(correct[m] / n),
        escalated_fraction=m / n,
        accuracy_kept=float(right_low[kept].mean()) if kept.any() else 1.0,
        accuracy_escalated=float(right_high[escalated].mean()) if escalated.any() else 1.0,
        accuracy_low=float(right_low.mean()),
        accuracy_high=float(right_high.mean()),
        n=n,
    )
