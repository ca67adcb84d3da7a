"""Filling a batch from the queue: shared by every policy."""

from __future__ import annotations

from collections.abc import Sequence

from policies.base import QueuedRequest


def take_batch(queue: Sequence[QueuedRequest], bits: int, max_images: int) -> tuple[int, ...]:
    """Ids of queued requests (in queue order) that allow ``bits``, up to ``max_images`` images.
    The first allowing request is always taken, even if alone it exceeds ``max_images``."""
    ids: list[int] = []
    images = 0
    for req in queue:
        if not req.allows(bits):
            continue
        if ids and images + req.size > max_images:
            break
        ids.append(req.id)
        images += req.size
    return tuple(ids)
