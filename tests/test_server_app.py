"""The app in-process (real FastAPI app, scheduler and worker threads) with a controllable engine.

The engine double returns logits that encode its input (so a test sees which request ran, in which batch,
at which bits) and can be held on a gate, so queueing, deadlines, priorities and batching are observable
without timing assumptions.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from kernels.engine import default_backend
from model_store.artifact import BITS
from model_store.artifact import load as artifact_load
from server.app import build_runtime, create_app
from server.settings import Settings, SettingsError, load_settings

INFER = "/v2/models/fashion-resnet/infer"
PROFILE = {
    "rows": [
        {"bits": b, "batch": n, "backend": "test", "ms_median": 2.0 * n, "ms_p90": 2.0 * n}
        for b in BITS
        for n in (1, 8)
    ],
    "accuracy": {str(b): 0.8 + 0.01 * i for i, b in enumerate(BITS)},
}


class GatedEngine:
    """Logits row i = [first pixel of image i, bits, 0...]; ``run`` waits while the gate is closed."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[tuple[int, list[int]]] = []  # (bits, first pixel of each image)
        self.started = threading.Event()

    def backend(self, bits: int) -> str:
        return "gated-test"

    def run(self, batch: np.ndarray, bits: int) -> np.ndarray:
        pixels = batch.reshape(batch.shape[0], -1)
        firsts = [int(round(float(v) * 255)) if batch.dtype != np.uint8 else int(v) for v in pixels[:, 0]]
        self.calls.append((bits, firsts))
        self.started.set()
        assert self.gate.wait(10), "test gate never opened"
        logits = np.zeros((batch.shape[0], 10), dtype=np.float32)
        logits[:, 0] = firsts
        logits[:, 1] = bits
        return logits


def _settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"max_batch_size": 8, "max_queue_size": 16, "policy": "hint"}
    base.update(overrides)
    return load_settings(None, **base)


@asynccontextmanager
async def serving(
    engine: GatedEngine | None = None, profile_data: dict | None = None, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(_settings(**overrides), engine=engine or GatedEngine(), profile_data=profile_data or PROFILE)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://apserve.test", timeout=20) as client:
            yield client


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def body(first: int = 1, n: int = 1, parameters: dict | None = None, datatype: str = "UINT8") -> dict:
    data: list[float] = []
    for i in range(n):
        image = [0] * 784
        image[0] = first + i
        data.extend(image)
    if datatype == "FP32":
        data = [v / 255 for v in data]
    req: dict[str, Any] = {"inputs": [{"name": "image", "datatype": datatype, "shape": [n, 784], "data": data}]}
    if parameters:
        req["parameters"] = parameters
    return req


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def wait_for_one_queued(c: httpx.AsyncClient, what: str) -> None:
    """Until /metrics shows exactly one request waiting in the queue."""
    for _ in range(100):
        if "apserve_queue_depth 1.0" in (await c.get("/metrics")).text:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} never showed in apserve_queue_depth")


# --- protocol over HTTP -----------------------------------------------------------------------------


def test_metadata_health_and_config() -> None:
    async def test() -> None:
        async with serving() as c:
            assert (await c.get("/v2")).json()["name"] == "apserve"
            assert (await c.get("/v2/health/live")).status_code == 200
            assert (await c.get("/v2/health/ready")).status_code == 200
            assert (await c.get("/v2/models/fashion-resnet/ready")).status_code == 200
            meta = (await c.get("/v2/models/fashion-resnet")).json()
            assert meta["inputs"][0]["name"] == "image" and meta["outputs"][0]["name"] == "logits"
            bits = {row["bits"]: row for row in meta["servable_bits"]}
            assert set(bits) == set(BITS) and bits[8]["latency_ms"]["1"] == 2.0
            assert bits[1]["accuracy"] == pytest.approx(0.8)
            config = (await c.get("/v2/models/fashion-resnet/config")).json()
            assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [784]
            missing = await c.get("/v2/models/other")
            assert missing.status_code == 404 and "other" in missing.json()["error"]

    run(test)


def test_json_infer_echoes_bits_and_timings() -> None:
    async def test() -> None:
        async with serving() as c:
            r = await c.post(INFER, json={**body(5, n=2), "id": "req-1"})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["id"] == "req-1" and out["model_name"] == "fashion-resnet"
            logits = np.array(out["outputs"][0]["data"]).reshape(out["outputs"][0]["shape"])
            assert logits.shape == (2, 10) and list(logits[:, 0]) == [5, 6]
            p = out["parameters"]
            assert p["bits"] == 8 and p["batch_size"] == 2  # hint policy, no hint: default bits
            assert p["queue_us"] >= 0 and p["compute_us"] >= 0

    run(test)


def test_infer_reads_a_streamed_body_and_refuses_other_methods() -> None:
    async def test() -> None:
        async with serving() as c:
            raw = json.dumps(body(7)).encode()

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the body arrives in pieces
                for i in range(0, len(raw), 1000):
                    yield raw[i : i + 1000]

            r = await c.post(INFER, content=chunks())
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == "application/json"
            assert r.json()["outputs"][0]["data"][0] == 7
            r = await c.get(INFER)  # the route still exists for the ordinary stack: 405, not 404
            assert r.status_code == 405 and "error" in r.json()
            r = await c.post(INFER.replace("fashion-resnet", "nope"), content=chunks())
            assert r.status_code == 404 and "nope" in r.json()["error"]

    run(test)


def test_binary_tensors_in_and_out() -> None:
    async def test() -> None:
        async with serving() as c:
            images = np.zeros((3, 1, 28, 28), dtype=np.float32)
            images[:, 0, 0, 0] = np.array([10, 20, 30]) / 255
            raw = images.tobytes()
            head = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "image",
                            "datatype": "FP32",
                            "shape": [3, 1, 28, 28],
                            "parameters": {"binary_data_size": len(raw)},
                        }
                    ],
                    "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
                    "parameters": {"precision": 2},
                }
            ).encode()
            r = await c.post(INFER, content=head + raw, headers={"Inference-Header-Content-Length": str(len(head))})
            assert r.status_code == 200, r.text
            n = int(r.headers["inference-header-content-length"])
            header = json.loads(r.content[:n])
            logits = np.frombuffer(r.content[n:], dtype="<f4").reshape(3, 10)
            assert list(logits[:, 0]) == [10, 20, 30] and list(logits[:, 1]) == [2, 2, 2]
            assert header["parameters"]["bits"] == 2

    run(test)


def test_precision_hints_are_honoured_or_refused() -> None:
    async def test() -> None:
        engine = GatedEngine()
        async with serving(engine) as c:
            r = await c.post(INFER, json=body(parameters={"precision": 3}))
            assert r.json()["parameters"]["bits"] == 3 and engine.calls[-1][0] == 3
            r = await c.post(INFER, json=body(parameters={"precision": 32}))
            assert r.json()["parameters"]["bits"] == 32
            r = await c.post(INFER, json=body(parameters={"min_bits": 2, "max_bits": 4}))
            assert 2 <= r.json()["parameters"]["bits"] <= 4
        async with serving(engine, policy="fixed-8") as c:
            calls = len(engine.calls)
            r = await c.post(INFER, json=body(parameters={"precision": 4}))  # strict: never run at 8
            assert r.status_code == 422 and "strict precision 4" in r.json()["error"]
            assert len(engine.calls) == calls
            r = await c.post(INFER, json=body(parameters={"precision": 4, "precision_policy": "best_effort"}))
            assert r.status_code == 200 and r.json()["parameters"]["bits"] == 8

    run(test)


def test_bits_missing_from_the_profile_are_not_servable() -> None:
    async def test() -> None:
        profile = {"rows": [row for row in PROFILE["rows"] if row["bits"] != 5]}
        async with serving(profile_data=profile) as c:
            r = await c.post(INFER, json=body(parameters={"precision": 5}))
            assert r.status_code == 422 and "5" in r.json()["error"]

    run(test)


def test_the_engine_runs_the_backend_the_profile_measured() -> None:
    """The profile's latencies are what the policies predict with: the engine must run those backends."""
    backends = {"1": "native", "8": "onnxruntime-fp32-codes", "32": "onnxruntime-fp32"}
    rows = [{**row, "backend": backends[str(row["bits"])]} for row in PROFILE["rows"] if row["bits"] in (1, 8, 32)]
    runtime = build_runtime(_settings(), profile_data={"rows": rows, "backends": backends})
    assert runtime.backend(8) == "onnxruntime-fp32-codes"
    assert runtime.backend(1).startswith("native-")
    logits = runtime.engine.run(np.zeros((1, 784), dtype=np.uint8), 8)
    assert logits.shape == (1, 10) and np.isfinite(logits).all()
    # without a choice in the profile: the engine's defaults
    default = build_runtime(_settings(), profile_data={"rows": rows}).backend(8)
    assert default.startswith(default_backend(8) + "-")  # int8 with AVX-512 VNNI, int16 without


def test_a_profile_from_other_hardware_is_replaced_by_a_quick_one_made_here_once(tmp_path, monkeypatch) -> None:
    """The bundled profile re-stamped as another CPU's: the start profiles this machine (the real quick
    profile, made smaller), keeps it in the cache and reads it back at the next start; the file given is
    never overwritten. With profile_on_start off the foreign file is used as it is."""
    from kernels import profiler

    foreign = json.loads(profiler.default_path(artifact_load()).read_text())
    foreign["fingerprint"] = {**foreign["fingerprint"], "cpu": "a CPU this is not"}
    given = tmp_path / "foreign.profile.json"
    given.write_text(json.dumps(foreign))
    monkeypatch.setattr(profiler, "QUICK_CHECK_IMAGES", 8)
    monkeypatch.setattr(profiler, "QUICK_MIN_MS", 1.0)
    cache = tmp_path / "cache"
    settings = _settings(profile_path=given, profile_cache_dir=cache)

    first = build_runtime(settings)
    assert Path(first.profile_source).parent == cache
    made = json.loads(Path(first.profile_source).read_text())
    assert made["mode"] == "quick"
    assert made["fingerprint"] == profiler.fingerprint(1) and made["model_sha256"] == foreign["model_sha256"]
    assert all(check["correct"] for check in made["checks"])
    assert {bits: first.backend(bits) for bits in (1, 2, 8, 32)} == {
        bits: made["backends"][str(bits)] for bits in (1, 2, 8, 32)
    }
    assert json.loads(given.read_text()) == foreign

    monkeypatch.setattr(profiler, "profile", lambda *a, **k: pytest.fail("profiled again"))
    assert build_runtime(settings).profile_source == first.profile_source
    assert build_runtime(_settings(profile_path=given, profile_on_start=False)).profile_source == str(given)


@pytest.mark.parametrize(
    ("backends", "message"),
    [
        ({"8": "onnxruntime-fp32"}, "'onnxruntime-fp32' cannot serve bits 8"),
        ({"8": "tpu"}, "'tpu' cannot serve bits 8"),
    ],
)
def test_a_profile_naming_a_backend_that_cannot_serve_its_bits_stops_the_start(
    backends: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=f"profile_path: backend {message}"):
        build_runtime(_settings(), profile_data={"rows": PROFILE["rows"], "backends": backends})


# --- scheduling -------------------------------------------------------------------------------------


def test_deadline_passing_in_queue_answers_504_without_compute() -> None:
    async def test() -> None:
        engine = GatedEngine()
        engine.gate.clear()
        async with serving(engine, workers=1) as c:
            blocker = asyncio.create_task(c.post(INFER, json=body(1)))
            await wait_for(engine.started.is_set, "first batch to start")
            late = await c.post(INFER, json=body(2, parameters={"timeout": 50_000}))  # 50 ms, queued behind
            assert late.status_code == 504 and "deadline" in late.json()["error"]
            engine.gate.set()
            assert (await blocker).status_code == 200
            assert all(2 not in firsts for _, firsts in engine.calls)  # never computed
            metrics = (await c.get("/metrics")).text
            assert 'apserve_requests_total{bits="none",outcome="timeout"} 1.0' in metrics

    run(test)


class SlowEngine(GatedEngine):
    """Every batch takes 20 ms: 10x what the test profile says for one image."""

    def run(self, batch: np.ndarray, bits: int) -> np.ndarray:
        time.sleep(0.02)
        return super().run(batch, bits)


def test_batches_slower_than_the_profile_raise_the_planned_latency() -> None:
    async def test() -> None:
        async with serving(SlowEngine()) as c:
            fits = body(parameters={"slo_ms": 6})  # 2 ms by the profile: admitted while the profile holds
            assert (await c.post(INFER, json=fits)).status_code in (200, 504)
            for _ in range(12):
                assert (await c.post(INFER, json=body())).status_code == 200
            scale = re.search(r"^apserve_latency_scale_ratio (\S+)$", (await c.get("/metrics")).text, re.M)
            assert scale is not None and float(scale.group(1)) > 3.0
            r = await c.post(INFER, json=fits)  # now planned at > 6 ms: refused before compute
            assert r.status_code == 503 and "cannot be met" in r.json()["error"]

    run(test)


def test_engine_cpu_and_profiled_time_are_counted_apart_from_wall_time() -> None:
    """A batch that sleeps takes wall time but no CPU time: the engine's CPU counter tells a slow machine
    (more CPU for the same batch) from a core the engine had to share (more wall time only)."""

    def sample(text: str, name: str) -> float:
        found = re.search(rf'^{name}{{bits="4"}} (\S+)$', text, re.M)
        assert found is not None, name
        return float(found.group(1))

    async def test() -> None:
        async with serving(SlowEngine()) as c:
            for i in range(5):
                r = await c.post(INFER, json=body(i, parameters={"precision": 4}))
                assert r.status_code == 200 and r.json()["parameters"]["batch_size"] == 1
            text = (await c.get("/metrics")).text
            assert sample(text, "apserve_engine_profiled_seconds_total") == pytest.approx(5 * 0.002)
            wall = sample(text, "apserve_compute_duration_seconds_sum")
            cpu = sample(text, "apserve_engine_cpu_seconds_total")
            assert wall >= 5 * 0.02 and 0.0 < cpu < 0.25 * wall

    run(test)


class CpuBoundEngine(GatedEngine):
    """Every batch burns 10 ms of the calling thread's CPU."""

    def run(self, batch: np.ndarray, bits: int) -> np.ndarray:
        end = time.thread_time() + 0.01
        while time.thread_time() < end:
            pass
        return super().run(batch, bits)


def test_the_workers_own_cpu_is_counted_apart_from_the_engines() -> None:
    """apserve_worker_cpu_seconds_total: what a worker spends around the batches (joining, accounting,
    deciding), not the engine's CPU: the simulator charges the one per batch and the other per image."""

    async def test() -> None:
        async with serving(CpuBoundEngine()) as c:
            for i in range(5):
                assert (await c.post(INFER, json=body(i))).status_code == 200
            text = (await c.get("/metrics")).text
            engine = sum(float(v) for v in re.findall(r"^apserve_engine_cpu_seconds_total\{.*\} (\S+)$", text, re.M))
            worker = re.search(r"^apserve_worker_cpu_seconds_total (\S+)$", text, re.M)
            assert worker is not None and engine >= 5 * 0.01
            assert 0.0 < float(worker.group(1)) < 0.5 * engine

    run(test)


def test_the_engine_idle_time_between_batches_is_measured_while_requests_wait() -> None:
    async def test() -> None:
        engine = GatedEngine()
        async with serving(engine) as c:
            engine.gate.clear()
            first = asyncio.create_task(c.post(INFER, json=body(1, parameters={"slo_ms": 5000})))  # held ~4.7 s
            await wait_for(engine.started.is_set, "the first batch")
            second = asyncio.create_task(c.post(INFER, json=body(2)))  # waits for the first batch
            await wait_for_one_queued(c, "the second request")
            engine.gate.set()
            assert (await first).status_code == 200 and (await second).status_code == 200
            text = (await c.get("/metrics")).text
            # one gap: before the second batch (the first waited for nothing), and a short one
            assert "apserve_batch_gap_seconds_count 1.0" in text
            total = re.search(r"^apserve_batch_gap_seconds_sum (\S+)$", text, re.M)
            assert total is not None and 0.0 <= float(total.group(1)) < 1.0

    run(test)


def test_a_worker_starts_the_next_batch_while_the_event_loop_is_busy() -> None:
    """The worker that finishes a batch decides and starts the next one itself: an event loop busy with
    other requests does not leave the engine idle between batches."""

    async def test() -> None:
        engine = GatedEngine()
        async with serving(engine, workers=1, max_batch_size=1) as c:
            engine.gate.clear()
            first = asyncio.create_task(c.post(INFER, json=body(1, parameters={"slo_ms": 5000})))  # held ~4.7 s
            await wait_for(engine.started.is_set, "the first batch")
            second = asyncio.create_task(c.post(INFER, json=body(2)))
            await wait_for_one_queued(c, "the second request")
            engine.gate.set()
            time.sleep(0.5)  # the event loop is blocked: only the worker can start the second batch
            assert [firsts for _, firsts in engine.calls] == [[1], [2]]
            assert (await first).status_code == 200 and (await second).status_code == 200

    run(test)


class WarmedEngine(GatedEngine):
    def __init__(self) -> None:
        super().__init__()
        self.warmed: list[int] = []

    def warm(self, bits: int) -> None:
        self.warmed.append(bits)


def test_bits_the_policies_choose_are_warmed_before_the_first_request() -> None:
    async def test() -> None:
        engine = WarmedEngine()
        async with serving(engine) as c:
            assert (await c.get("/v2/health/ready")).status_code == 200
            # the test profile: every bits equally fast, fp32 the most accurate -> Pareto {32}; default 8
            assert sorted(engine.warmed) == [8, 32]
            assert engine.calls == []

    run(test)


def test_impossible_deadline_is_refused_at_once() -> None:
    async def test() -> None:
        engine = GatedEngine()
        async with serving(engine) as c:
            r = await c.post(INFER, json=body(parameters={"slo_ms": 1}))  # profile: 2 ms at best
            assert r.status_code == 503 and "cannot be met" in r.json()["error"] and "retry-after" in r.headers
            assert engine.calls == []

    run(test)


def test_full_queue_answers_429_with_retry_after() -> None:
    async def test() -> None:
        engine = GatedEngine()
        engine.gate.clear()
        async with serving(engine, workers=1, max_queue_size=2) as c:
            first = asyncio.create_task(c.post(INFER, json=body(1, parameters={"slo_ms": 5000})))  # held ~4.7 s
            await wait_for(engine.started.is_set, "first batch to start")
            queued = [asyncio.create_task(c.post(INFER, json=body(i))) for i in (2, 3)]
            for _ in range(100):
                if "apserve_queue_depth 2.0" in (await c.get("/metrics")).text:
                    break
                await asyncio.sleep(0.01)
            r = await c.post(INFER, json=body(4))
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["error"]
            engine.gate.set()
            assert [t.status_code for t in await asyncio.gather(first, *queued)] == [200, 200, 200]

    run(test)


class BusyEngine(GatedEngine):
    """Takes 1 ms per batch with the GIL released, as the native engine does."""

    def run(self, batch: np.ndarray, bits: int) -> np.ndarray:
        time.sleep(0.001)
        return super().run(batch, bits)


def test_many_requests_each_get_their_own_answer_while_workers_and_the_loop_both_decide() -> None:
    """200 requests at once against two workers and batches of up to 4: workers decide their next batch
    while the loop admits more; every request is answered once, with its own row, and nothing is left."""

    async def test() -> None:
        engine = BusyEngine()
        async with serving(engine, workers=2, max_batch_size=4, max_queue_size=256, policy="fixed-8") as c:
            results = await asyncio.gather(*(c.post(INFER, json=body(i % 200)) for i in range(200)))
            assert [r.status_code for r in results] == [200] * 200
            assert [r.json()["outputs"][0]["data"][0] for r in results] == [float(i % 200) for i in range(200)]
            assert sum(len(firsts) for _, firsts in engine.calls) == 200
            assert max(len(firsts) for _, firsts in engine.calls) > 1  # batches formed under the load
            text = (await c.get("/metrics")).text
            assert "apserve_queue_depth 0.0" in text
            assert 'apserve_requests_total{bits="8",outcome="ok"} 200.0' in text

    run(test)


def test_every_free_worker_starts_a_batch_at_once() -> None:
    async def test() -> None:
        engine = GatedEngine()
        engine.gate.clear()
        async with serving(engine, workers=2, max_batch_size=1, policy="fixed-8") as c:
            tasks = [asyncio.create_task(c.post(INFER, json=body(i))) for i in (1, 2, 3)]
            await wait_for(lambda: len(engine.calls) == 2, "a batch on each of the two workers")
            await wait_for_one_queued(c, "the third request")  # it waits for a worker
            assert sorted(firsts[0] for _, firsts in engine.calls) == [1, 2]
            engine.gate.set()
            results = await asyncio.gather(*tasks)
            assert [r.json()["outputs"][0]["data"][0] for r in results] == [1, 2, 3]
            assert "apserve_queue_depth 0.0" in (await c.get("/metrics")).text

    run(test)


def test_priority_then_deadline_order() -> None:
    async def test() -> None:
        engine = GatedEngine()
        engine.gate.clear()
        async with serving(engine, workers=1, max_batch_size=1) as c:
            first = asyncio.create_task(c.post(INFER, json=body(1, parameters={"slo_ms": 5000})))  # held ~4.7 s
            await wait_for(engine.started.is_set, "first batch to start")
            tasks = [
                asyncio.create_task(c.post(INFER, json=body(10, parameters={"priority": 3}))),
                asyncio.create_task(c.post(INFER, json=body(20, parameters={"priority": 1, "slo_ms": 5000}))),
                asyncio.create_task(c.post(INFER, json=body(30, parameters={"priority": 1, "slo_ms": 1000}))),
                asyncio.create_task(c.post(INFER, json=body(40))),  # default priority 2
            ]
            await asyncio.sleep(0.3)
            engine.gate.set()
            assert all(r.status_code == 200 for r in await asyncio.gather(first, *tasks))
            order = [firsts[0] for _, firsts in engine.calls]
            assert order == [1, 30, 20, 40, 10]

    run(test)


def test_requests_queued_behind_a_batch_are_batched_together() -> None:
    async def test() -> None:
        engine = GatedEngine()
        engine.gate.clear()
        async with serving(engine, workers=1) as c:
            first = asyncio.create_task(c.post(INFER, json=body(1, parameters={"slo_ms": 5000})))  # held ~4.7 s
            await wait_for(engine.started.is_set, "first batch to start")
            tasks = [asyncio.create_task(c.post(INFER, json=body(i, n=2))) for i in (10, 20, 30)]
            strict4 = asyncio.create_task(c.post(INFER, json=body(40, parameters={"precision": 4})))
            await asyncio.sleep(0.3)
            engine.gate.set()
            results = await asyncio.gather(first, *tasks, strict4)
            assert all(r.status_code == 200 for r in results)
            assert [r.json()["parameters"]["batch_size"] for r in results[1:4]] == [6, 6, 6]
            assert engine.calls[1] == (8, [10, 11, 20, 21, 30, 31])  # only requests that allow 8 bits
            assert engine.calls[2] == (4, [40]) and results[4].json()["parameters"]["bits"] == 4

    run(test)


def test_batching_delay_waits_for_a_fuller_batch() -> None:
    async def test() -> None:
        engine = GatedEngine()
        async with serving(engine, max_queue_delay_ms=300) as c:
            results = await asyncio.gather(*(c.post(INFER, json=body(i)) for i in (1, 2, 3)))
            assert [r.json()["parameters"]["batch_size"] for r in results] == [3, 3, 3]
            assert len(engine.calls) == 1

    run(test)


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "headers", "status", "names"),
    [
        (b"{", {}, 400, "JSON"),
        (
            json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 784], "data": [0] * 784}]}),
            {},
            400,
            "'x'",
        ),
        (json.dumps(body(parameters={"precision": 12})), {}, 400, "precision"),
        (json.dumps(body(parameters={"min_bits": 8, "max_bits": 2})), {}, 400, "min_bits"),
        (
            json.dumps({"inputs": [{"name": "image", "datatype": "BOOL", "shape": [1, 784], "data": [0] * 784}]}),
            {},
            400,
            "BOOL",
        ),
        (
            json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 784], "data": [2.0] * 784}]}),
            {},
            400,
            "[0, 1]",
        ),
        (json.dumps(body()), {"Inference-Header-Content-Length": "99999"}, 400, "Inference-Header-Content-Length"),
        (b"x" * 5000, {}, 413, "limit"),
    ],
)
def test_bad_input_gets_4xx_naming_the_problem(content: bytes | str, headers: dict, status: int, names: str) -> None:
    async def test() -> None:
        async with serving(max_body_bytes=4096) as c:
            r = await c.post(INFER, content=content, headers=headers)
            assert r.status_code == status and names in r.json()["error"]
            ok = await c.post(INFER, json=body())  # and the server still serves
            assert ok.status_code == 200

    run(test)


def test_unknown_model_and_route() -> None:
    async def test() -> None:
        async with serving() as c:
            r = await c.post("/v2/models/nope/infer", json=body())
            assert r.status_code == 404 and "nope" in r.json()["error"]
            assert "error" in (await c.get("/v2/nothing")).json()

    run(test)


# --- /v1/classify -----------------------------------------------------------------------------------


def _image(fmt: str, size: tuple[int, int] = (300, 200), background: int = 255) -> bytes:
    image = Image.new("RGB", size, (background,) * 3)
    image.paste((40, 40, 40), (100, 50, 200, 150))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def test_classify_png_and_jpeg() -> None:
    async def test() -> None:
        engine = GatedEngine()
        async with serving(engine) as c:
            r = await c.post("/v1/classify?precision=2", files={"file": ("shirt.png", _image("PNG"), "image/png")})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["bits"] == 2 and len(out["top5"]) == 5 and out["inverted"] is True
            assert sum(t["probability"] for t in out["top5"]) <= 1.0 + 1e-6
            assert out["top5"][0]["label"] in ("T-shirt/top", "Trouser") and engine.calls[-1][0] == 2
            r = await c.post("/v1/classify", content=_image("JPEG"), headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200 and r.json()["bits"] == 8
            bad = await c.post("/v1/classify", files={"file": ("x.png", b"not an image", "image/png")})
            assert bad.status_code == 400 and "decodable" in bad.json()["error"]
            bad = await c.post("/v1/classify?precision=11", content=_image("PNG"))
            assert bad.status_code == 400 and "precision" in bad.json()["error"]
            bad = await c.post("/v1/classify", files={"other": ("x.png", _image("PNG"), "image/png")})
            assert bad.status_code == 400 and "'file'" in bad.json()["error"]

    run(test)


# --- admin API ---------------------------------------------------------------------------------------


def test_admin_api_is_off_without_a_token() -> None:
    async def test() -> None:
        async with serving() as c:
            r = await c.get("/v1/policy", headers={"Authorization": "Bearer x"})
            assert r.status_code == 404 and "APSERVE_ADMIN_TOKEN" in r.json()["error"]

    run(test)


def test_admin_auth_and_validation() -> None:
    async def test() -> None:
        async with serving(admin_token="s3cret") as c:
            assert (await c.get("/v1/policy")).status_code == 401
            assert (await c.get("/v1/policy", headers={"Authorization": "Basic s3cret"})).status_code == 401
            assert (await c.get("/v1/policy", headers={"Authorization": "Bearer wrong"})).status_code == 403
            auth = {"Authorization": "Bearer s3cret"}
            assert (await c.get("/v1/policy", headers=auth)).json()["policy"] == "hint"
            assert (await c.put("/v1/policy", json={"policy": "fixed-4"})).status_code == 401
            r = await c.put("/v1/policy", json={"policy": "nonsense"}, headers=auth)
            assert r.status_code == 422 and "nonsense" in r.json()["error"]
            r = await c.put("/v1/policy", json={"policy": "fixed-4", "colour": "red"}, headers=auth)
            assert r.status_code == 422 and "colour" in r.json()["error"]
            r = await c.put("/v1/policy", json={"nopolicy": 1}, headers=auth)
            assert r.status_code == 422
            r = await c.put("/v1/policy", json={"policy": "fixed-4"}, headers=auth)
            assert r.status_code == 200 and r.json() == {"policy": "fixed-4", "options": {}, "previous": "hint"}
            assert (await c.get("/v1/policy", headers=auth)).json()["policy"] == "fixed-4"
            assert (await c.post(INFER, json=body())).json()["parameters"]["bits"] == 4
            assert 'policy="fixed-4"' in (await c.get("/metrics")).text

    run(test)


def test_policy_swap_under_load_loses_no_request() -> None:
    async def test() -> None:
        engine = GatedEngine()
        engine.gate.clear()
        async with serving(engine, workers=1, max_batch_size=2, admin_token="t") as c:
            first = asyncio.create_task(c.post(INFER, json=body(1, parameters={"slo_ms": 5000})))  # held ~4.7 s
            await wait_for(engine.started.is_set, "first batch to start")
            before = [asyncio.create_task(c.post(INFER, json=body(i))) for i in range(2, 8)]
            await asyncio.sleep(0.2)
            r = await c.put("/v1/policy", json={"policy": "fixed-2"}, headers={"Authorization": "Bearer t"})
            assert r.status_code == 200
            after = [asyncio.create_task(c.post(INFER, json=body(i))) for i in range(8, 12)]
            engine.gate.set()
            results = await asyncio.gather(first, *before, *after)
            assert [r.status_code for r in results] == [200] * 11
            assert {r.json()["parameters"]["bits"] for r in results[1:]} == {2}  # all queued work under the new policy
            served = sorted(f for _, firsts in engine.calls for f in firsts)
            assert served == list(range(1, 12))

    run(test)


# --- metrics and settings ----------------------------------------------------------------------------

METRIC_NAMES = [
    "apserve_requests_total",
    "apserve_images_total",
    "apserve_request_duration_seconds_bucket",
    "apserve_queue_duration_seconds_bucket",
    "apserve_compute_duration_seconds_bucket",
    "apserve_batch_size_bucket",
    "apserve_queue_depth",
    "apserve_batches_total",
    "apserve_slo_violations_total",
    "apserve_rejections_total",
    "apserve_served_accuracy",
    "apserve_backend_info",
    "apserve_build_info",
]


def test_metrics_expose_the_documented_names() -> None:
    async def test() -> None:
        async with serving(slo_ms=5000) as c:
            await c.post(INFER, json=body(n=3, parameters={"precision": 1}))
            await c.post(INFER, json=body(parameters={"precision": 99}))
            text = (await c.get("/metrics")).text
            for name in METRIC_NAMES:
                assert f"\n{name}" in text, name
            assert 'apserve_images_total{bits="1"} 3.0' in text
            assert 'apserve_batches_total{bits="1",policy="hint",reason="hint"} 1.0' in text
            assert 'apserve_requests_total{bits="none",outcome="invalid"} 1.0' in text
            assert 'apserve_rejections_total{reason="queue_full"} 0.0' in text
            assert "apserve_slo_seconds 5.0" in text
            assert 'le="0.0025"' in text

    run(test)


def test_invalid_settings_name_the_setting(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="max_batch_size"):
        load_settings(None, max_batch_size=0)
    with pytest.raises(SettingsError, match="default_bits"):
        load_settings(None, default_bits=9)
    config = tmp_path / "apserve.yaml"
    config.write_text("port: 9001\nmax-queue-size: 7\npolicy: fixed-2\n")
    assert load_settings(config).max_queue_size == 7
    monkeypatch.setenv("APSERVE_MAX_QUEUE_SIZE", "9")
    settings = load_settings(config, port=9100)
    assert (settings.max_queue_size, settings.port, settings.policy) == (9, 9100, "fixed-2")  # flag > env > file
    config.write_text("colour: red\n")
    with pytest.raises(SettingsError, match="colour"):
        load_settings(config)
    with pytest.raises(SettingsError, match="policy"):
        create_app(load_settings(None, policy="fastest"), engine=GatedEngine(), profile_data=PROFILE)


@pytest.mark.parametrize(
    ("policy", "options"),
    [
        ("queue", {}),
        ("slo", {}),
        ("composite", {}),
        ("power", {"budget_w": 1000.0}),
        # no efficient-batch wait: it would hold a lone request to a few ms before its deadline, where one
        # event-loop stall (a garbage collection) refuses it; the next test covers the wait with room to spare
        ("cascade", {"threshold": 0.5}),
    ],
)
def test_every_policy_serves_through_the_scheduler(policy: str, options: dict) -> None:
    async def test() -> None:
        async with serving(policy=policy, policy_options=options, slo_ms=5000) as c:
            results = await asyncio.gather(*(c.post(INFER, json=body(i)) for i in range(1, 6)))
            assert [r.status_code for r in results] == [200] * 5, [r.text for r in results]
            assert all(r.json()["parameters"]["bits"] in BITS for r in results)
            strict = await c.post(INFER, json=body(parameters={"precision": 2}))
            assert strict.status_code == 200 and strict.json()["parameters"]["bits"] == 2

    run(test)


def test_cascade_holds_a_small_batch_for_mates_until_its_latest_start() -> None:
    """The cascade's efficient-batch wait through the real scheduler. The profile has a fixed cost per call
    (2 ms + 1 ms per image: batches of 5 or more are efficient), so a lone request waits until its latest
    start: its deadline less the margin and the runs at 1 and 8 bits. Arrivals that fill an efficient batch
    end the wait. The margin is wide so that no event-loop stall carries the wait past the deadline."""
    rows = [
        {"bits": b, "batch": n, "backend": "test", "ms_median": 2.0 + n, "ms_p90": 2.0 + n}
        for b in BITS
        for n in (1, 8)
    ]
    profile = {**PROFILE, "rows": rows}
    options = {"threshold": 0.5, "margin_ms": 300}

    async def test() -> None:
        engine = GatedEngine()
        async with serving(engine, profile_data=profile, policy="cascade", policy_options=options, slo_ms=800) as c:
            lone = await c.post(INFER, json=body(1))
            assert lone.status_code == 200, lone.text
            assert lone.json()["parameters"]["queue_us"] >= 400_000  # held: latest start ~486 ms after arrival
            assert engine.calls == [(1, [1]), (8, [1])]  # unsure at 1 bit (logits 1, 1, 0...): re-run at 8
            first = asyncio.create_task(c.post(INFER, json=body(1, parameters={"slo_ms": 5000})))  # held ~4.7 s
            await wait_for_one_queued(c, "the first request")
            mates = [c.post(INFER, json=body(i)) for i in range(2, 6)]
            results = await asyncio.gather(first, *mates)
            assert [r.status_code for r in results] == [200] * 5, [r.text for r in results]
            bits, firsts = engine.calls[2]
            assert bits == 1 and sorted(firsts) == [1, 2, 3, 4, 5]  # one batch at 1 bit (in deadline order)
            assert results[0].json()["parameters"]["queue_us"] < 2_500_000  # the mates ended its wait

    run(test)


def test_every_finished_batch_reaches_the_energy_accounting() -> None:
    async def test() -> None:
        engine = GatedEngine()
        engine.gate.clear()
        async with serving(engine, workers=1, max_batch_size=1, power_source="model") as c:
            first = asyncio.create_task(c.post(INFER, json=body(1, parameters={"slo_ms": 5000})))  # held ~4.7 s
            await wait_for(engine.started.is_set, "first batch to start")
            second = asyncio.create_task(c.post(INFER, json=body(2)))  # queued: a decision follows batch 1
            await wait_for_one_queued(c, "the second request")
            engine.gate.set()
            results = await asyncio.gather(first, second)  # batch 2 ends with nothing queued
            text = (await c.get("/metrics")).text  # read at once: no batch may be missing
            energy = float(text.split("\napserve_energy_joules_total ")[1].split()[0])
            # the model meter charges each batch its profiled CPU time (no CPU figures in PROFILE: one busy
            # core for the profiled 2 ms of a 1-image batch) at 10 W per core, however long it really ran
            assert all(r.status_code == 200 for r in results)
            assert energy == pytest.approx(2 * 10.0 * 0.002)

    run(test)


def test_power_budget_reaches_the_meter_on_a_policy_swap() -> None:
    async def test() -> None:
        async with serving(admin_token="t", power_source="model") as c:
            auth = {"Authorization": "Bearer t"}
            r = await c.put("/v1/policy", json={"policy": "power", "budget_w": 42.0}, headers=auth)
            assert r.status_code == 200, r.text
            assert (await c.post(INFER, json=body())).status_code == 200
            text = (await c.get("/metrics")).text
            assert "apserve_power_budget_watts 42.0" in text
            assert 'apserve_power_watts{source="model"}' in text
            r = await c.put("/v1/policy", json={"policy": "power"}, headers=auth)
            assert r.status_code == 422 and "budget_w" in r.json()["error"]

    run(test)
