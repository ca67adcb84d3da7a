"""KServe v2 request parsing and response encoding (server/protocol.py), without a server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.protocol import ProtocolError, encode_infer_response, parse_infer, parse_options

LIMITS = {"max_batch_size": 8, "priority_levels": 3}


def _json(inputs: list | None = None, parameters: dict | None = None, **extra: object) -> bytes:
    body: dict[str, object] = {"inputs": inputs if inputs is not None else [_tensor()]}
    if parameters is not None:
        body["parameters"] = parameters
    body.update(extra)
    return json.dumps(body).encode()


def _tensor(shape: list | None = None, datatype: str = "UINT8", data: object = None) -> dict:
    shape = shape or [1, 784]
    n = int(np.prod(shape))
    return {"name": "image", "shape": shape, "datatype": datatype, "data": data if data is not None else [7] * n}


def _binary(images: np.ndarray, datatype: str, **params: object) -> tuple[bytes, str]:
    raw = images.tobytes()
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": list(images.shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "parameters": params,
    }
    head = json.dumps(header).encode()
    return head + raw, str(len(head))


def test_json_uint8_flat_and_nested() -> None:
    flat = parse_infer(_json([_tensor([2, 784], data=list(range(256)) * 6 + [0] * 32)]), None, **LIMITS)
    assert flat.images.shape == (2, 784) and flat.images.dtype == np.uint8
    assert flat.images[0, 255] == 255
    nested = np.arange(784, dtype=np.int64).reshape(1, 1, 28, 28) % 256
    req = parse_infer(_json([_tensor([1, 1, 28, 28], data=nested.tolist())]), None, **LIMITS)
    np.testing.assert_array_equal(req.images[0], nested.ravel())


def test_json_fp32() -> None:
    req = parse_infer(_json([_tensor([1, 784], "FP32", [0.5] * 784)]), None, **LIMITS)
    assert req.images.dtype == np.float32 and float(req.images[0, 0]) == 0.5


def test_binary_tensors_are_read_as_they_are() -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 784), dtype=np.uint8)
    body, length = _binary(images, "UINT8", binary_data_output=True)
    req = parse_infer(body, length, **LIMITS)
    np.testing.assert_array_equal(req.images, images)
    assert req.binary_output
    floats = (images / 255.0).astype("<f4").reshape(3, 1, 28, 28)
    body, length = _binary(floats, "FP32")
    np.testing.assert_array_equal(parse_infer(body, length, **LIMITS).images, floats.reshape(3, 784))


def test_options_defaults_and_hints() -> None:
    opts = parse_options(None, priority_levels=3)
    assert opts.hint.preferred is None and not opts.hint.strict and opts.timeout_s is None and opts.priority == 0
    opts = parse_options({"precision": 4}, priority_levels=3)
    assert opts.hint.preferred == 4 and opts.hint.strict  # a numeric precision is strict by default
    opts = parse_options({"precision": 4, "precision_policy": "best_effort"}, priority_levels=3)
    assert opts.hint.preferred == 4 and not opts.hint.strict
    opts = parse_options({"precision": "auto", "min_bits": 2, "max_bits": 6}, priority_levels=3)
    assert (opts.hint.min_bits, opts.hint.max_bits, opts.hint.preferred) == (2, 6, None)
    opts = parse_options({"timeout": 30_000, "slo_ms": 50, "priority": 1}, priority_levels=3)
    assert opts.timeout_s == pytest.approx(0.03) and opts.priority == 1  # the tighter of timeout and slo_ms
    assert parse_options({"precision": 32}, priority_levels=3).hint.preferred == 32


@pytest.mark.parametrize(
    ("params", "names"),
    [
        ({"precision": 9}, "precision"),
        ({"precision": 0}, "precision"),
        ({"precision": "high"}, "precision"),
        ({"precision": True}, "precision"),
        ({"min_bits": 6, "max_bits": 2}, "min_bits"),
        ({"precision": 8, "max_bits": 4}, "outside"),
        ({"precision_policy": "maybe", "precision": 4}, "precision_policy"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": 1.5}, "timeout"),
        ({"slo_ms": "soon"}, "slo_ms"),
        ({"slo_ms": 0}, "slo_ms"),
        ({"priority": 7}, "priority"),
        ({"priority": -1}, "priority"),
    ],
)
def test_bad_parameters_name_the_problem(params: dict, names: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_infer(_json(parameters=params), None, **LIMITS)
    assert err.value.status == 400 and names in err.value.message


@pytest.mark.parametrize(
    ("body", "length", "names"),
    [
        (b"{not json", None, "JSON"),
        (b"[1, 2]", None, "object"),
        (_json([]), None, "inputs"),
        (_json([{**_tensor(), "name": "pixels"}]), None, "pixels"),
        (_json([_tensor(), _tensor()]), None, "exactly one input"),
        (_json([_tensor([1, 28, 28])]), None, "shape"),
        (_json([_tensor([1, 783], data=[0] * 783)]), None, "shape"),
        (_json([_tensor([9, 784])]), None, "max_batch_size"),
        (_json([_tensor([0, 784], data=[])]), None, "batch"),
        (_json([_tensor(datatype="INT64")]), None, "datatype"),
        (_json([_tensor(data=[1] * 700)]), None, "700 values"),
        (_json([_tensor(data=[256] + [0] * 783)]), None, "0..255"),
        (_json([_tensor(data=[-1] + [0] * 783)]), None, "0..255"),
        (_json([_tensor(data=[0.5] * 784)]), None, "integers"),
        (_json([_tensor(data=["1"] * 784)]), None, "integers"),
        (_json([_tensor(datatype="FP32", data=[1.5] + [0.0] * 783)]), None, "[0, 1]"),
        (
            b'{"inputs":[{"name":"image","datatype":"FP32","shape":[1,784],"data":[NaN' + b",0" * 783 + b"]}]}",
            None,
            "NaN",
        ),
        (_json([_tensor(datatype="FP32", data=[1e400] + [0.0] * 783)]), None, "NaN or infinity"),
        (_json([_tensor(data=[[1, 2], [3]])]), None, "regular"),
        (_json(outputs=[{"name": "probs"}]), None, "probs"),
        (_json(), "abc", "Inference-Header-Content-Length"),
        (_json(), "100000", "does not fit"),
        (_json() + b"\x00" * 10, str(len(_json())), "binary data"),
    ],
)
def test_bad_requests_name_the_problem(body: bytes, length: str | None, names: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_infer(body, length, **LIMITS)
    assert 400 <= err.value.status < 500
    assert names in err.value.message


def test_binary_header_that_lies_about_lengths() -> None:
    images = np.zeros((2, 784), dtype=np.uint8)
    body, length = _binary(images, "UINT8")
    with pytest.raises(ProtocolError, match="binary_data_size"):  # one byte missing
        parse_infer(body[:-1], length, **LIMITS)
    head = json.loads(body[: int(length)])
    head["inputs"][0]["parameters"]["binary_data_size"] = 784  # claims one image, shape says two
    text = json.dumps(head).encode()
    with pytest.raises(ProtocolError, match="does not match shape"):
        parse_infer(text + images.tobytes(), str(len(text)), **LIMITS)
    with pytest.raises(ProtocolError, match="Inference-Header-Content-Length header is missing"):
        parse_infer(text, None, **LIMITS)


def test_response_json_and_binary() -> None:
    logits = np.arange(20, dtype=np.float32).reshape(2, 10)
    params = {"bits": 4, "queue_us": 1, "compute_us": 2, "batch_size": 2}
    body, headers = encode_infer_response("m", "id-1", logits, params, binary=False)
    decoded = json.loads(body)
    assert headers == {} and decoded["id"] == "id-1" and decoded["parameters"] == params
    assert decoded["outputs"][0]["shape"] == [2, 10] and decoded["outputs"][0]["data"] == list(range(20))
    body, headers = encode_infer_response("m", None, logits, params, binary=True)
    n = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:n])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 80
    np.testing.assert_array_equal(np.frombuffer(body[n:], dtype="<f4").reshape(2, 10), logits)
