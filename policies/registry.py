"""Policies by name: the same names on the command line, in the config file and in PUT /v1/policy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from policies.base import ALL_BITS, Policy
from policies.cascade import CascadePolicy
from policies.composite import CompositePolicy
from policies.fixed import FixedPolicy
from policies.hint import HintPolicy
from policies.power import DEFAULT_WATTS_PER_CORE, PowerPolicy
from policies.queue_depth import DEFAULT_LEVELS, QueueDepthPolicy
from policies.slo import SloPolicy


class PolicyError(ValueError):
    """Unknown policy name or invalid policy settings; the message says which."""


def _fixed(bits: int) -> Callable[[Mapping[str, Any]], Policy]:
    def build(options: Mapping[str, Any]) -> Policy:
        if options:
            raise PolicyError(f"fixed-{bits} takes no settings, got {sorted(options)}")
        return FixedPolicy(bits)

    return build


def _hint(options: Mapping[str, Any]) -> Policy:
    if options:
        raise PolicyError(f"hint takes no settings, got {sorted(options)}")
    return HintPolicy()


class _Options:
    """Reads one policy's settings, each checked once; leftover keys are an error naming them."""

    def __init__(self, policy: str, options: Mapping[str, Any]):
        self.policy = policy
        self.left = dict(options)

    def number(self, key: str, default: float | None, low: float, high: float = float("inf")) -> float | None:
        value = self.left.pop(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise PolicyError(f"{self.policy}: {key} must be a number in [{low}, {high}], got {value!r}")
        return float(value)

    def required(self, key: str, low: float, high: float = float("inf")) -> float:
        if key not in self.left:
            raise PolicyError(f"{self.policy}: setting {key!r} is required")
        value = self.number(key, None, low, high)
        assert value is not None
        return value

    def integer(self, key: str, default: int, low: int) -> int:
        value = self.left.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PolicyError(f"{self.policy}: {key} must be an integer >= {low}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.left.pop(key, default)
        if not isinstance(value, bool):
            raise PolicyError(f"{self.policy}: {key} must be true or false, got {value!r}")
        return value

    def bits(self, key: str, default: int) -> int:
        value = self.left.pop(key, default)
        if isinstance(value, bool) or value not in ALL_BITS:
            raise PolicyError(f"{self.policy}: {key} must be one of {list(ALL_BITS)}, got {value!r}")
        return int(value)

    def done(self) -> None:
        if self.left:
            raise PolicyError(f"{self.policy}: unknown settings {sorted(self.left)}")


def _slo_from(opts: _Options) -> SloPolicy:
    return SloPolicy(
        target_batch=opts.integer("target_batch", 1, 1),
        hold_ms=opts.number("hold_ms", 0.0, 0.0, 1000.0) or 0.0,
        margin_ms=opts.number("margin_ms", SloPolicy.margin_ms, 0.0, 1000.0) or 0.0,
    )


def _slo(options: Mapping[str, Any]) -> Policy:
    opts = _Options("slo", options)
    policy = _slo_from(opts)
    opts.done()
    return policy


def _queue(options: Mapping[str, Any]) -> Policy:
    opts = _Options("queue", options)
    raw = opts.left.pop("levels", [list(level) for level in DEFAULT_LEVELS])
    if not isinstance(raw, list | tuple) or not raw:
        raise PolicyError("queue: levels must be a non-empty list of [depth, bits]")
    levels: list[tuple[int, int]] = []
    for level in raw:
        ok = isinstance(level, list | tuple) and len(level) == 2
        depth, bits = (level[0], level[1]) if ok else (None, None)
        if not ok or isinstance(depth, bool) or not isinstance(depth, int) or depth < 0 or bits not in ALL_BITS:
            raise PolicyError(f"queue: each level must be [depth >= 0, bits in {list(ALL_BITS)}], got {level!r}")
        levels.append((int(depth), int(bits)))
    if levels[0][0] != 0:
        raise PolicyError(f"queue: the first level must start at depth 0, got {levels[0][0]}")
    if any(b[0] <= a[0] for a, b in zip(levels, levels[1:], strict=False)):
        raise PolicyError(f"queue: level depths must increase, got {[d for d, _ in levels]}")
    hysteresis = opts.integer("hysteresis", 8, 0)
    gaps = [b[0] - a[0] for a, b in zip(levels, levels[1:], strict=False)]
    if gaps and hysteresis >= min(gaps):
        raise PolicyError(f"queue: hysteresis {hysteresis} must be smaller than the smallest level gap {min(gaps)}")
    opts.done()
    return QueueDepthPolicy(levels=tuple(levels), hysteresis=hysteresis)


def _power(options: Mapping[str, Any]) -> Policy:
    opts = _Options("power", options)
    budget = opts.required("budget_w", 0.001)
    wpc = opts.number("watts_per_core", DEFAULT_WATTS_PER_CORE, 0.001)
    margin = opts.number("margin_ms", PowerPolicy.margin_ms, 0.0, 1000.0) or 0.0
    opts.done()
    return PowerPolicy(budget_w=budget, watts_per_core=wpc or DEFAULT_WATTS_PER_CORE, margin_ms=margin)


def _cascade(options: Mapping[str, Any]) -> Policy:
    opts = _Options("cascade", options)
    threshold = opts.required("threshold", 0.0, 1.0)
    low = opts.bits("low_bits", 1)
    high = opts.bits("high_bits", 8)
    if ALL_BITS.index(low) >= ALL_BITS.index(high):
        raise PolicyError(f"cascade: low_bits ({low}) must be below high_bits ({high})")
    efficient = opts.boolean("efficient_batches", True)
    margin = opts.number("margin_ms", CascadePolicy.margin_ms, 0.0, 1000.0) or 0.0
    opts.done()
    return CascadePolicy(
        threshold=threshold, low_bits=low, high_bits=high, efficient_batches=efficient, margin_ms=margin
    )


def _composite(options: Mapping[str, Any]) -> Policy:
    opts = _Options("composite", options)
    slo = _slo_from(opts)
    budget = opts.number("budget_w", None, 0.001)
    wpc = opts.number("watts_per_core", DEFAULT_WATTS_PER_CORE, 0.001)
    opts.done()
    return CompositePolicy(slo=slo, budget_w=budget, watts_per_core=wpc or DEFAULT_WATTS_PER_CORE)


BUILDERS: dict[str, Callable[[Mapping[str, Any]], Policy]] = {f"fixed-{b}": _fixed(b) for b in ALL_BITS}
BUILDERS.update(hint=_hint, queue=_queue, slo=_slo, power=_power, cascade=_cascade, composite=_composite)


def names() -> list[str]:
    return list(BUILDERS)


def build_policy(name: str, options: Mapping[str, Any] | None = None) -> Policy:
    """A fresh policy (deciders with memory, like `queue`, start over)."""
    if name not in BUILDERS:
        raise PolicyError(f"unknown policy {name!r}; choose one of {', '.join(BUILDERS)}")
    return BUILDERS[name](dict(options or {}))
