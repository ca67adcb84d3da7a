"""Policies by name: the same names on the command line, in the config file and in PUT /v1/policy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from policies.base import ALL_BITS, Policy
from policies.fixed import FixedPolicy
from policies.hint import HintPolicy


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


BUILDERS: dict[str, Callable[[Mapping[str, Any]], Policy]] = {f"fixed-{b}": _fixed(b) for b in ALL_BITS}
BUILDERS["hint"] = _hint


def names() -> list[str]:
    return list(BUILDERS)


def build_policy(name: str, options: Mapping[str, Any] | None = None) -> Policy:
    if name not in BUILDERS:
        raise PolicyError(f"unknown policy {name!r}; choose one of {', '.join(BUILDERS)}")
    return BUILDERS[name](dict(options or {}))
