"""Schemathesis fuzzes every operation of the server's OpenAPI schema over real HTTP on 127.0.0.1:
no 5xx, no hang. The app runs on uvicorn in a thread with a fast engine double, so the fuzzer exercises the
HTTP, protocol and scheduling code rather than waiting on compute."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings

from model_store.artifact import BITS
from server.app import create_app
from server.settings import load_settings

PROFILE = {"rows": [{"bits": b, "batch": 1, "backend": "test", "ms_median": 0.1, "ms_p90": 0.1} for b in BITS]}


class EchoEngine:
    def run(self, batch: np.ndarray, bits: int) -> np.ndarray:
        return np.full((batch.shape[0], 10), float(bits), dtype=np.float32)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    app = create_app(
        load_settings(None, max_batch_size=8, max_body_bytes=65536, admin_token="fuzz-token"),
        engine=EchoEngine(),
        profile_data=PROFILE,
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=30)


def test_no_5xx_and_no_hang(server_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{server_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    seen: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            admin = "/v1/policy" in case.path
            for headers in ({"Authorization": "Bearer fuzz-token"}, None) if admin else (None,):
                response = case.call(base_url=server_url, headers=headers, timeout=10)
                where = f"{case.method} {case.formatted_path}"
                # 503/504 are the answers to a deadline (a fuzzed `timeout` of a few µs) that cannot be met
                deadline = response.status_code in (503, 504) and "deadline" in response.text
                assert response.status_code < 500 or deadline, f"{where}: {response.status_code} {response.text[:300]}"
                if response.status_code >= 400:
                    assert "error" in response.json(), f"{where}: {response.text[:300]}"

        check()
        seen.append(operation.label)
    assert any("infer" in label for label in seen) and any("/v1/policy" in label for label in seen)


def test_server_still_serves_after_fuzzing(server_url: str) -> None:
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 784], "data": [0] * 784}]}
    r = httpx.post(f"{server_url}/v2/models/fashion-resnet/infer", json=body, timeout=10)
    assert r.status_code == 200
