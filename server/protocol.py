"""Open Inference Protocol (KServe v2) REST: parsing an infer request and encoding its response.

Hand-written rather than pydantic on the hot path: the tensor payload is the expensive part of a request,
so JSON data goes straight to numpy and binary data (the binary tensor extension) is a ``np.frombuffer``
view — no per-element Python. Every problem a client can cause raises ``ProtocolError`` with a 4xx status
and a message naming it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from policies.base import ALL_BITS, FP32

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
PIXELS = 784
CLASSES = 10
HEADER_LENGTH = "inference-header-content-length"
DATATYPES: dict[str, np.dtype] = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}


class ProtocolError(Exception):
    """A request the client got wrong: ``status`` (4xx) and a message naming the problem."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Hint:
    """The client's precision wishes: hard bounds, a preferred bits, and whether it is strict."""

    min_bits: int = 1
    max_bits: int = FP32
    preferred: int | None = None
    strict: bool = False


@dataclass(frozen=True, slots=True)
class RequestOptions:
    hint: Hint
    timeout_s: float | None  # relative deadline; None: none
    priority: int  # 0: the server's default


@dataclass(frozen=True, slots=True)
class InferRequest:
    id: str | None
    images: np.ndarray  # [B, 784], uint8 pixels or float32 in [0, 1]
    options: RequestOptions
    binary_output: bool


# --- parameters -------------------------------------------------------------------------------------


def _int_param(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ProtocolError(f"parameter {name!r} must be an integer, got {json.dumps(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ProtocolError(f"parameter {name!r} must be an integer, got {json.dumps(value)}")


def _bits_param(name: str, value: Any) -> int:
    bits = _int_param(name, value)
    if bits not in ALL_BITS:
        raise ProtocolError(f"parameter {name!r} = {bits} is not a servable bit-width; choose 1..8 or 32")
    return bits


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ProtocolError(f"parameter {name!r} must be a positive number, got {json.dumps(value)}")
    try:
        number = float(value)
    except ValueError:
        raise ProtocolError(f"parameter {name!r} must be a positive number, got {json.dumps(value)}") from None
    if not math.isfinite(number) or number < 0:
        raise ProtocolError(f"parameter {name!r} must be a positive number, got {value}")
    return number


def parse_options(
    params: dict[str, Any] | None, *, priority_levels: int, allow_precision_auto: bool = True
) -> RequestOptions:
    """The request-level ``parameters`` this server understands; other keys are ignored (as Triton does)."""
    params = params or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    precision = params.get("precision")
    preferred: int | None = None
    if precision is not None and not (allow_precision_auto and precision == "auto"):
        preferred = _bits_param("precision", precision)
    min_bits = _bits_param("min_bits", params["min_bits"]) if params.get("min_bits") is not None else 1
    max_bits = _bits_param("max_bits", params["max_bits"]) if params.get("max_bits") is not None else FP32
    if min_bits > max_bits:
        raise ProtocolError(f"min_bits {min_bits} > max_bits {max_bits}")
    if preferred is not None and not min_bits <= preferred <= max_bits:
        raise ProtocolError(f"precision {preferred} is outside min_bits..max_bits = {min_bits}..{max_bits}")
    policy = params.get("precision_policy")
    if policy is None:
        strict = preferred is not None
    elif policy in ("strict", "best_effort"):
        strict = policy == "strict" and preferred is not None
    else:
        raise ProtocolError(f"parameter 'precision_policy' must be 'strict' or 'best_effort', got {json.dumps(policy)}")

    timeout_s: float | None = None
    if params.get("timeout") is not None:
        timeout_us = _int_param("timeout", params["timeout"])
        if timeout_us < 0:
            raise ProtocolError(f"parameter 'timeout' must be >= 0 microseconds, got {timeout_us}")
        timeout_s = timeout_us / 1e6 if timeout_us else None  # 0 means none, as Triton
    if params.get("slo_ms") is not None:
        slo_ms = _positive_number("slo_ms", params["slo_ms"])
        if slo_ms == 0:
            raise ProtocolError("parameter 'slo_ms' must be > 0")
        timeout_s = slo_ms / 1e3 if timeout_s is None else min(timeout_s, slo_ms / 1e3)
    priority = 0
    if params.get("priority") is not None:
        priority = _int_param("priority", params["priority"])
        if not 0 <= priority <= priority_levels:
            raise ProtocolError(f"parameter 'priority' must be 0..{priority_levels} (1 is the highest), got {priority}")
    return RequestOptions(Hint(min_bits, max_bits, preferred, strict), timeout_s, priority)


# --- tensors ----------------------------------------------------------------------------------------


def _shape(tensor: dict[str, Any], max_batch_size: int) -> tuple[int, int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError(f"input {INPUT_NAME!r} needs 'shape', a list of integers")
    if shape[1:] not in ([1, 28, 28], [PIXELS]) or len(shape) not in (2, 4):
        raise ProtocolError(f"input {INPUT_NAME!r} shape {shape} must be [B, 1, 28, 28] or [B, 784]")
    batch = shape[0]
    if not 1 <= batch <= max_batch_size:
        raise ProtocolError(f"input {INPUT_NAME!r} batch {batch} must be 1..{max_batch_size} (max_batch_size)")
    return batch, batch * PIXELS


def _check_values(images: np.ndarray, datatype: str) -> None:
    if datatype == "FP32":
        if not np.isfinite(images).all():
            raise ProtocolError(f"input {INPUT_NAME!r} holds NaN or infinity")
        if images.min() < 0.0 or images.max() > 1.0:
            raise ProtocolError(f"input {INPUT_NAME!r} FP32 pixel values must lie in [0, 1]")


def _from_json_data(data: Any, datatype: str, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(f"input {INPUT_NAME!r} 'data' must be a list")
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        raise ProtocolError(f"input {INPUT_NAME!r} 'data' is not a regular nested list of numbers") from None
    if array.size != count:
        raise ProtocolError(f"input {INPUT_NAME!r} holds {array.size} values but its shape needs {count}")
    kind = array.dtype.kind
    if datatype == "UINT8":
        if kind not in "iub":
            raise ProtocolError(f"input {INPUT_NAME!r} UINT8 data must be integers")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ProtocolError(f"input {INPUT_NAME!r} UINT8 pixel values must lie in 0..255")
        return array.astype(np.uint8).reshape(-1, PIXELS)
    if kind not in "iuf":
        raise ProtocolError(f"input {INPUT_NAME!r} FP32 data must be numbers")
    return array.astype(np.float32).reshape(-1, PIXELS)


def _loads(body: bytes) -> Any:
    """orjson (4-5 x faster than the standard library here); what it refuses (NaN and 1e400, which some
    clients send for floats, lone surrogates, broken JSON) is read by the standard library, which accepts
    the first two, so that the checks below name the problem, and words the errors of the rest."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def parse_infer(body: bytes, header_length: str | None, *, max_batch_size: int, priority_levels: int) -> InferRequest:
    """Parse a v2 infer request body (JSON, or JSON header + binary tensors when ``header_length`` is set)."""
    binary = b""
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
        if not 0 < json_length <= len(body):
            raise ProtocolError(
                f"Inference-Header-Content-Length {json_length} does not fit a body of {len(body)} bytes"
            )
        body, binary = body[:json_length], body[json_length:]
    try:
        request = _loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ProtocolError("request body must be a JSON object")

    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    params = request.get("parameters")
    options = parse_options(params, priority_levels=priority_levels)

    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(f"'inputs' must be a non-empty list holding the input {INPUT_NAME!r}")
    if not all(isinstance(t, dict) for t in inputs):
        raise ProtocolError("every entry of 'inputs' must be an object")
    names = [t.get("name") for t in inputs]
    unknown = [n for n in names if n != INPUT_NAME]
    if unknown or len(inputs) != 1:
        raise ProtocolError(f"the model takes exactly one input {INPUT_NAME!r}, got {names}")
    tensor = inputs[0]
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(f"input {INPUT_NAME!r} datatype {datatype!r} is not supported; use UINT8 or FP32")
    _, count = _shape(tensor, max_batch_size)

    tensor_params = tensor.get("parameters") or {}
    if not isinstance(tensor_params, dict):
        raise ProtocolError(f"input {INPUT_NAME!r} 'parameters' must be an object")
    if tensor_params.get("binary_data_size") is not None:
        if header_length is None:
            raise ProtocolError("binary_data_size is set but the Inference-Header-Content-Length header is missing")
        size = _int_param("binary_data_size", tensor_params["binary_data_size"])
        expected = count * DATATYPES[datatype].itemsize
        if size != expected:
            raise ProtocolError(f"binary_data_size {size} does not match shape and datatype ({expected} bytes)")
        if size != len(binary):
            raise ProtocolError(f"binary_data_size {size} does not match the {len(binary)} bytes after the JSON header")
        images = np.frombuffer(binary, dtype=DATATYPES[datatype]).reshape(-1, PIXELS)
    else:
        if binary:
            raise ProtocolError(f"{len(binary)} bytes of binary data follow the JSON header but no input claims them")
        if "data" not in tensor:
            raise ProtocolError(f"input {INPUT_NAME!r} has neither 'data' nor binary_data_size")
        images = _from_json_data(tensor["data"], datatype, count)
    _check_values(images, datatype)

    binary_output = bool(isinstance(params, dict) and params.get("binary_data_output") is True)
    outputs = request.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise ProtocolError("'outputs' must be a list of objects")
        for output in outputs:
            if output.get("name") != OUTPUT_NAME:
                raise ProtocolError(f"unknown output {output.get('name')!r}; the model has one output {OUTPUT_NAME!r}")
            out_params = output.get("parameters") or {}
            if isinstance(out_params, dict) and "binary_data" in out_params:
                binary_output = out_params["binary_data"] is True
    return InferRequest(request_id, images, options, binary_output)


def encode_infer_response(
    model_name: str, request_id: str | None, logits: np.ndarray, parameters: dict[str, Any], binary: bool
) -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers; with ``binary`` the logits follow the JSON header as raw FP32."""
    output: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [int(logits.shape[0]), CLASSES]}
    raw = b""
    if binary:
        raw = np.ascontiguousarray(logits, dtype="<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = logits.ravel().tolist()
    response: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": [output]}
    if request_id is not None:
        response["id"] = request_id
    response["parameters"] = parameters
    header = orjson.dumps(response)
    if not binary:
        return header, {}
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}
