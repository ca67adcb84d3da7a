"""`apserve serve` as a real process on 127.0.0.1 with the real engine: Triton's own client, a graceful
SIGTERM under load, and start-up refusing an invalid setting."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest

MODEL = "fashion-resnet"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def apserve(**env: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = _free_port()
    full_env = {**os.environ, **{f"APSERVE_{k.upper()}": v for k, v in env.items()}}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}"
                )
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not become ready in 90 s")
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_invalid_setting_stops_the_start() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(_free_port())],
        env={**os.environ, "APSERVE_MAX_BATCH_SIZE": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "max_batch_size" in result.stderr


def test_tritonclient_json_and_binary_with_parameters() -> None:
    tritonclient = pytest.importorskip("tritonclient.http")
    from kernels.engine import Engine
    from model_store import artifact

    images = np.random.default_rng(1).integers(0, 256, (2, 784), dtype=np.uint8)
    expected = Engine(artifact.load()).run(images.reshape(2, 1, 28, 28), 4)
    with apserve(max_batch_size="4") as (_, url):
        client = tritonclient.InferenceServerClient(url=url.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        assert client.get_model_metadata(MODEL)["inputs"][0]["name"] == "image"
        assert client.get_model_config(MODEL)["max_batch_size"] == 4

        results = {}
        for binary in (False, True):
            tensor = tritonclient.InferInput("image", [2, 784], "UINT8")
            tensor.set_data_from_numpy(images, binary_data=binary)
            output = tritonclient.InferRequestedOutput("logits", binary_data=binary)
            result = client.infer(
                MODEL,
                [tensor],
                outputs=[output],
                request_id=f"r-{binary}",
                priority=1,
                timeout=120_000_000,
                parameters={"precision": 4, "precision_policy": "strict"},
            )
            response = result.get_response()
            assert response["id"] == f"r-{binary}"
            assert response["parameters"]["bits"] == 4 and response["parameters"]["batch_size"] >= 2
            results[binary] = result.as_numpy("logits")
        np.testing.assert_allclose(results[True], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(results[False], expected, rtol=1e-5, atol=1e-5)

        fp32 = tritonclient.InferInput("image", [1, 1, 28, 28], "FP32")
        fp32.set_data_from_numpy((images[:1] / 255.0).astype(np.float32).reshape(1, 1, 28, 28), binary_data=True)
        result = client.infer(MODEL, [fp32], parameters={"precision": 1})  # no outputs: all binary
        assert result.as_numpy("logits").shape == (1, 10) and result.get_response()["parameters"]["bits"] == 1

        with pytest.raises(tritonclient.InferenceServerException, match="precision"):
            client.infer(MODEL, [tensor], parameters={"precision": 9})
        client.close()


def test_sigterm_under_load_answers_every_admitted_request() -> None:
    """Closed-loop clients keep the queue busy; after SIGTERM every request is either answered 200 (admitted
    before), refused 503 (arrived while draining) or refused a connection (after exit). A reset or a read
    error on a sent request would be a lost request."""
    with apserve(max_batch_size="8", workers="1") as (proc, url):
        pixels = np.arange(8 * 784, dtype=np.uint8).tolist()
        request = {
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [8, 784], "data": pixels}],
            "parameters": {"precision": 32},
        }
        outcomes: list[tuple[str, float]] = []  # (outcome, time it completed)
        lock = threading.Lock()
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=120) as http:
                while not stop.is_set():
                    try:
                        r = http.post(f"{url}/v2/models/{MODEL}/infer", json=request)
                        outcome = str(r.status_code)
                        if r.status_code == 503 and "shutting down" not in r.json()["error"]:
                            outcome = f"503 {r.json()['error']}"
                    except httpx.ConnectError:
                        outcome = "refused"
                    except httpx.HTTPError as exc:
                        outcome = f"lost: {type(exc).__name__}"
                    with lock:
                        outcomes.append((outcome, time.monotonic()))
                    if outcome != "200":
                        return

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while not any(o == "200" for o, _ in outcomes):
            assert time.monotonic() < deadline, "no request answered under load"
            time.sleep(0.05)
        time.sleep(0.5)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        stop.set()
        assert proc.wait(timeout=60) == 0
        kinds = {o for o, _ in outcomes}
        assert kinds <= {"200", "503", "refused"}, kinds
        assert any(o == "200" and at > signalled for o, at in outcomes), "nothing was in flight at SIGTERM"
