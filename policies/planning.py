"""What the deciders share: which bits each request may get, batch filling, and a plan of the queue.

Bits a request may get (``Planner.candidates``):
- strict hint: exactly the hinted bits;
- best-effort hint ``p``: ``p``, or any Pareto bits inside its bounds that is faster than ``p`` (a hint is
  an upper wish: the policy may only trade it down for a deadline or a budget, never serve more);
- no hint ("auto"): the Pareto bits inside its bounds. Only Pareto bits are chosen automatically; if the
  bounds exclude every Pareto bits, the bounds are an explicit ask and every profiled bits in them counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from policies.base import ALL_BITS, QueuedRequest, Snapshot

INF = float("inf")


class Planner:
    """Per-snapshot helper; caches per-request answers for one ``decide`` call."""

    def __init__(self, snapshot: Snapshot, margin_s: float = 0.0):
        self.snap = snapshot
        self.profile = snapshot.profile
        self.margin_s = margin_s + snapshot.answer_delay_s
        self.profiled = set(self.profile.bits)
        self.pareto = tuple(b for b in self.profile.pareto if b in self.profiled)
        self._cands: dict[tuple[int, int, int | None, bool], tuple[int, ...]] = {}
        self._cheapest: dict[tuple[int, int, int | None, bool, int], tuple[int | None, float | None]] = {}
        self._info: dict[int, tuple[list[float] | None, float, int]] = {}
        self._rows: dict[int, list[float]] = {}
        self._efficient: dict[tuple[int, float], int] = {}

    # --- bits -----------------------------------------------------------------------------------
    def accuracy_key(self, bits: int) -> tuple[float, float, int]:
        """Sort key, most preferable last: accuracy, then lower latency, then fewer bits."""
        acc = self.snap.accuracy.get(bits)
        rank = ALL_BITS.index(bits) / 100.0 if acc is None else acc
        return (rank, -self.profile.latency(bits, 1), -bits)

    def latency(self, bits: int, images: int) -> float:
        """Predicted latency of a batch: the profile, scaled by what batches lately really took, and the
        idle time between batches."""
        return self.profile.latency(bits, images) * self.snap.latency_scale + self.snap.batch_gap_s

    def candidates(self, req: QueuedRequest) -> tuple[int, ...]:
        """Bits ``req`` may get, most preferable first."""
        # a queue holds few distinct kinds of request: cache by what the answer depends on
        kind = (req.min_bits, req.max_bits, req.preferred_bits, req.strict)
        cached = self._cands.get(kind)
        if cached is not None:
            return cached
        if req.strict and req.preferred_bits is not None:
            bits = [req.preferred_bits] if req.preferred_bits in self.profiled else []
        elif req.preferred_bits is not None and req.allows(req.preferred_bits) and req.preferred_bits in self.profiled:
            ceiling = self.latency(req.preferred_bits, 1)
            bits = [req.preferred_bits] + [
                b for b in self.pareto if req.allows(b) and b != req.preferred_bits and self.latency(b, 1) < ceiling
            ]
        else:
            bits = [b for b in self.pareto if req.allows(b)]
            if not bits:
                bits = [b for b in self.profiled if req.allows(b)]
        result = tuple(sorted(bits, key=self.accuracy_key, reverse=True))
        self._cands[kind] = result
        return result

    def cheapest(self, req: QueuedRequest) -> int | None:
        return self._cheapest_alone(req)[0]

    def alone(self, req: QueuedRequest) -> float | None:
        """How long ``req`` takes run alone at its cheapest bits (None: no bits allowed)."""
        return self._cheapest_alone(req)[1]

    def _cheapest_alone(self, req: QueuedRequest) -> tuple[int | None, float | None]:
        kind = (req.min_bits, req.max_bits, req.preferred_bits, req.strict, req.size)
        found = self._cheapest.get(kind)
        if found is None:
            cands = self.candidates(req)
            bits = min(cands, key=lambda b: (self.latency(b, req.size), b)) if cands else None
            found = self._cheapest[kind] = (bits, None if bits is None else self.latency(bits, req.size))
        return found

    def efficient_batch(self, bits: int, slack: float = 1.15) -> int:
        """The smallest batch whose time per image is within ``slack`` x the best batch's (up to
        ``max_batch_size``): below it, a batch spends the core on fixed costs that bigger batches share,
        the engine's own and the server's between batches (``Snapshot.batch_gap_s``)."""
        key = (bits, slack)
        if key not in self._efficient:
            top = max(self.snap.max_batch_size, 1)
            per_image = [self.latency(bits, n) / n for n in range(1, top + 1)]
            best = min(per_image)
            self._efficient[key] = next(n for n, cost in enumerate(per_image, start=1) if cost <= slack * best)
        return self._efficient[key]

    # --- batches --------------------------------------------------------------------------------
    def fill(self, queue: Sequence[QueuedRequest], bits: int, max_images: int | None = None) -> list[QueuedRequest]:
        """Queued requests (in queue order) that may get ``bits``, up to ``max_images`` images (the first is
        always taken)."""
        limit = self.snap.max_batch_size if max_images is None else max_images
        batch: list[QueuedRequest] = []
        images = 0
        for req in queue:
            if bits not in self.candidates(req):
                continue
            if batch and images + req.size > limit:
                break
            batch.append(req)
            images += req.size
        return batch

    def fitting_prefix(self, batch: Sequence[QueuedRequest], bits: int, start: float) -> int:
        """How many leading requests of ``batch`` finish by their deadlines (less the margin) when the batch
        of them starts at ``start`` (0 if not even the first does)."""
        best = 0
        images = 0
        earliest = INF
        for i, req in enumerate(batch):
            images += req.size
            if req.deadline is not None:
                earliest = min(earliest, req.deadline)
            if start + self.latency(bits, images) > earliest - self.margin_s:
                break
            best = i + 1
        return best

    # --- plan -----------------------------------------------------------------------------------
    def _plan_info(self, req: QueuedRequest) -> tuple[list[float] | None, float, int]:
        """(latency by images at the request's cheapest bits, deadline less margin, size), cached."""
        info = self._info.get(req.id)
        if info is None:
            bits = self.cheapest(req)
            row = None
            if bits is not None:
                row = self._rows.get(bits)
                if row is None:
                    top = max(self.snap.max_batch_size, 1)
                    row = self._rows[bits] = [0.0] + [self.latency(bits, n) for n in range(1, top + 1)]
            deadline = INF if req.deadline is None else req.deadline - self.margin_s
            info = self._info[req.id] = (row, deadline, req.size)
        return info

    def late_in_plan(self, queue: Sequence[QueuedRequest], start: float) -> list[QueuedRequest]:
        """Requests that would miss their deadline if the queue, from ``start``, ran in queue order at each
        request's cheapest bits, a request joining the open batch when everyone in it still makes it (the
        batch runs at its slowest member's bits). A late request is skipped, so it delays no one behind it
        (it is the one to refuse). Called several times per decision: kept to plain arithmetic."""
        late: list[QueuedRequest] = []
        cap = self.snap.max_batch_size
        t = start  # when the open batch starts
        is_open = False
        images = 0
        batch_latency = 0.0
        earliest = INF
        for req in queue:
            row, deadline, size = self._plan_info(req)
            if row is None:
                late.append(req)
                continue
            if is_open and images + size <= cap:
                joined = row[images + size]
                if joined < batch_latency:
                    joined = batch_latency
                bound = earliest if earliest < deadline else deadline
                if t + joined <= bound:
                    images += size
                    batch_latency = joined
                    earliest = bound
                    continue
            alone_start = t + batch_latency if is_open else t
            alone = row[size] if size < len(row) else self.latency(self.cheapest(req) or 0, size)
            if alone_start + alone > deadline:
                late.append(req)
                continue
            t, is_open, images, batch_latency, earliest = alone_start, True, size, alone, deadline
        return late


def take_fitting(
    planner: Planner,
    queue: Sequence[QueuedRequest],
    bits: int,
    accept: Callable[[int, int], bool] | None = None,
) -> list[QueuedRequest]:
    """The largest leading part of ``fill(bits)`` whose images satisfy ``accept(bits, images)``."""
    batch = planner.fill(queue, bits)
    if accept is None:
        return batch
    images = 0
    for i, req in enumerate(batch):
        images += req.size
        if not accept(bits, images):
            return batch[:i]
    return batch
