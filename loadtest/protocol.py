"""KServe v2 binary tensor requests and the traffic mix, without Locust (so tests can import it).

A binary request is a JSON header whose input carries `parameters.binary_data_size`, followed by the raw
tensor bytes; the header's length goes in `Inference-Header-Content-Length`. We ask for the logits as
binary too, so the reply is a JSON header (with `parameters.bits`, `queue_us`, ...) and then raw floats.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_BYTES = 28 * 28


class MixError(ValueError):
    """A traffic mix setting is invalid; the message names it."""


@dataclass(frozen=True)
class Mix:
    """Weighted choices, e.g. "auto:8,1:1,8:1" = 80 % no hint, 10 % 1 bit, 10 % 8 bits."""

    values: tuple[str, ...]
    weights: tuple[float, ...]

    def pick(self, rng: random.Random) -> str:
        return self.values[0] if len(self.values) == 1 else rng.choices(self.values, self.weights)[0]


def parse_mix(text: str, what: str, allowed: set[str] | None = None) -> Mix:
    values, weights = [], []
    for item in text.split(","):
        value, _, weight = item.strip().partition(":")
        value = value.strip()
        if not value:
            raise MixError(f"{what} mix {text!r}: empty entry")
        if allowed is not None and value not in allowed:
            raise MixError(f"{what} mix {text!r}: {value!r} is not one of {sorted(allowed)}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise MixError(f"{what} mix {text!r}: weight {weight!r} is not a number") from None
        if not w >= 0:
            raise MixError(f"{what} mix {text!r}: weight {w} must be >= 0")
        values.append(value)
        weights.append(w)
    if sum(weights) <= 0:
        raise MixError(f"{what} mix {text!r}: weights sum to 0")
    return Mix(tuple(values), tuple(weights))


PRECISIONS = {"auto", "1", "2", "3", "4", "5", "6", "7", "8", "32"}


def precision_mix(text: str) -> Mix:
    return parse_mix(text, "precision", PRECISIONS)


def number_mix(text: str, what: str) -> Mix:
    mix = parse_mix(text, what)
    for v in mix.values:
        try:
            if float(v) < 0:
                raise ValueError
        except ValueError:
            raise MixError(f"{what} mix {text!r}: {v!r} is not a number >= 0") from None
    return mix


def request_parameters(precision: str, slo_ms: float, priority: int) -> dict[str, Any]:
    """v2 request `parameters`; "auto", slo 0 and priority 0 mean: leave it to the server."""
    params: dict[str, Any] = {}
    if precision != "auto":
        params["precision"] = int(precision)
        params["precision_policy"] = "best_effort"
    if slo_ms > 0:
        params["slo_ms"] = slo_ms
    if priority > 0:
        params["priority"] = priority
    return params


def encode_infer(images: bytes, batch: int, parameters: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a binary v2 infer request for `batch` uint8 28x28 images."""
    if len(images) != batch * IMAGE_BYTES:
        raise ValueError(f"{batch} images need {batch * IMAGE_BYTES} bytes, got {len(images)}")
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": "image",
                "shape": [batch, 1, 28, 28],
                "datatype": "UINT8",
                "parameters": {"binary_data_size": len(images)},
            }
        ],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    if parameters:
        header["parameters"] = dict(parameters)
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return head + images, headers


def decode_infer(body: bytes, headers: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON part of a v2 reply (binary or plain JSON): its `parameters` hold bits, queue_us, ..."""
    length = next((v for k, v in headers.items() if k.lower() == HEADER_LENGTH.lower()), None)
    head = body[: int(length)] if length is not None else body
    reply = json.loads(head)
    if not isinstance(reply, dict):
        raise ValueError("v2 reply is not a JSON object")
    return reply
