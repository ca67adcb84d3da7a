"""The FastAPI app: KServe v2 REST, /v1/classify, /metrics and the admin API.

``create_app(settings)`` loads the model, the profile and the policy eagerly (so a bad setting stops the
start with a clear message) and returns an app whose lifespan owns all mutable state (``app.state.runtime``).

Status codes, always with the v2 error body ``{"error": "..."}``:
400 a malformed request (the message names the field); 404 unknown model or route, or the admin API when
APSERVE_ADMIN_TOKEN is unset; 413 body over ``max_body_bytes``; 422 a strict precision (or bits bounds)
the active policy or the profile cannot serve, or invalid policy settings; 429 + Retry-After the queue is
full; 503 + Retry-After a deadline that cannot be met even at the fastest allowed bits (refused at
admission, or early by the policy), or the server is draining; 504 the deadline passed while queued
(never computed); 401/403 admin API without / with a wrong bearer token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import io
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from kernels.engine import Engine
from model_store import artifact as artifact_store
from policies.base import LatencyProfile, Policy
from policies.profile import STANDIN_BACKEND, ProfileError, parse_profile, standin_document
from policies.registry import PolicyError, build_policy
from server.metrics import CONTENT_TYPE, Metrics
from server.protocol import HEADER_LENGTH, INPUT_NAME, OUTPUT_NAME, ProtocolError, encode_infer_response, parse_infer
from server.protocol import parse_options as parse_request_options
from server.scheduler import Outcome, Refused, Runner, Scheduler, SchedulerConfig
from server.settings import Settings, SettingsError

log = logging.getLogger("apserve.app")
MAX_IMAGE_PIXELS = 40_000_000  # a decoded upload larger than this is refused (decompression bombs)


def _version() -> str:
    try:
        return metadata.version("apserve")
    except metadata.PackageNotFoundError:
        return "0.0.0"


# --- start-up: model, profile, policy -----------------------------------------------------------------


def _profile_dict(artifact: artifact_store.Artifact, settings: Settings) -> tuple[dict[str, Any], str]:
    """The profile document of docs/INTERNALS.md and where it came from: the saved file when it was made
    on this hardware for this model; else, with ``profile_on_start``, this machine's quick profile
    (kernels.profiler.for_this_machine: cached, or made now in about 20 s); else the saved file with a
    warning (its accuracy only if it was made for this very model); with no file, policies.profile's
    stand-in latencies."""
    from kernels import profiler

    path, threads = settings.resolved_profile_path, settings.engine_threads
    doc = None
    if path.is_file():
        try:
            doc = dict(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise SettingsError(f"invalid setting profile_path: {path} is not a readable profile ({exc})") from None
        if profiler.matches(doc, artifact, threads):
            return doc, str(path)
    if settings.profile_on_start:
        found, source = profiler.for_this_machine(artifact, path, threads, settings.profile_cache_dir)
        return dict(found), str(source)
    if doc is None:
        log.warning("no profile at %s: stand-in latencies until `apserve profile` writes one", path)
        standin = standin_document(threads)
        standin.pop("accuracy", None)  # accuracy comes from the artifact or is unknown, never invented
        return standin, f"stand-in figures (no profile at {path}; run `apserve profile`)"
    log.warning("profile %s was made on other hardware, threads or model; run `apserve profile`", path)
    if doc.get("model_sha256") != profiler.model_sha256(artifact):  # another model's accuracy: not ours
        doc.pop("accuracy", None)
        doc.pop("pareto", None)
    return doc, str(path)


def _engine(model: artifact_store.Artifact, settings: Settings, profiled: Mapping[int, str]) -> Engine:
    """The engine with the backend the profile chose for each bits it profiled (its latencies are the
    policies' predictions, so the engine must run what was measured); defaults for the rest."""
    backends = {b: name for b, name in profiled.items() if b in model.bits and name != STANDIN_BACKEND}
    try:
        return Engine(model, threads=settings.engine_threads, backends=backends)
    except ValueError as exc:
        raise SettingsError(f"invalid setting profile_path: {exc}") from None


def _power_meter(settings: Settings, profile: LatencyProfile) -> Any:
    """server/power.py's meter when that module exists (written with the power policy), else None."""
    try:
        from server import power  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    factory = getattr(power, "meter_from_settings", None)
    if factory is None:
        return None
    try:
        return factory(settings, profile)
    except ValueError as exc:  # power.PowerError: a power setting the meter cannot use
        raise SettingsError(f"invalid setting power: {exc}") from None


@dataclass
class Runtime:
    settings: Settings
    artifact: artifact_store.Artifact
    engine: Runner
    profile: LatencyProfile
    profile_data: dict[str, Any]
    profile_source: str
    accuracy: dict[int, float]
    servable: tuple[int, ...]
    metrics: Metrics
    policy_name: str
    policy_options: dict[str, Any]
    scheduler: Scheduler
    power_meter: Any = None
    draining: bool = False
    started: bool = False
    policy_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def backend(self, bits: int) -> str:
        name = getattr(self.engine, "backend", None)
        return str(name(bits)) if callable(name) else "custom"


def build_runtime(
    settings: Settings, engine: Runner | None = None, profile_data: Mapping[str, Any] | None = None
) -> Runtime:
    model = artifact_store.load(settings.model_path)
    try:
        policy = build_policy(settings.policy, settings.policy_options)
    except PolicyError as exc:
        raise SettingsError(f"invalid setting policy: {exc}") from None
    if profile_data is not None:
        profile_data, source = dict(profile_data), "given"
    else:
        profile_data, source = _profile_dict(model, settings)
    try:  # the simulator's parser: both read a profile the same way
        parsed = parse_profile(profile_data, source, accuracy=model.accuracy("test"))
    except ProfileError as exc:
        raise SettingsError(f"invalid setting profile_path: {exc}") from None
    profile, accuracy = parsed.latency, parsed.accuracy
    runner: Runner = engine if engine is not None else _engine(model, settings, parsed.backends)
    profiled = {bits for bits, _ in profile.table}
    servable = tuple(b for b in model.bits if b in profiled)
    if settings.default_bits not in servable:
        raise SettingsError(f"invalid setting default_bits: {settings.default_bits} is not servable {servable}")
    warm = getattr(runner, "warm", None)
    if warm is not None:  # sessions for the bits the policies choose by themselves: not the first request's cost
        for bits in sorted({*(b for b in profile.pareto if b in servable), settings.default_bits}):
            warm(bits)
    metrics = Metrics()
    meter = _power_meter(settings, profile)
    config = SchedulerConfig(
        max_batch_size=settings.max_batch_size,
        max_queue_size=settings.max_queue_size,
        max_queue_delay_s=settings.max_queue_delay_ms / 1e3,
        workers=settings.workers,
        default_bits=settings.default_bits,
        default_priority=settings.default_priority,
        default_timeout_s=None if settings.slo_ms is None else settings.slo_ms / 1e3,
        servable=servable,
        accuracy=accuracy,
    )
    record_batch = getattr(meter, "record_batch", None)

    def on_batch(bits: int, images: int, seconds: float, end: float) -> None:
        joules = record_batch(bits, images, seconds, end) if record_batch is not None else None
        if joules:
            metrics.energy.inc(float(joules))

    scheduler = Scheduler(runner, policy, profile, config, metrics, power_meter=meter, on_batch=on_batch)
    runtime = Runtime(
        settings=settings,
        artifact=model,
        engine=runner,
        profile=profile,
        profile_data=profile_data,
        profile_source=source,
        accuracy=accuracy,
        servable=servable,
        metrics=metrics,
        policy_name=policy.name,
        policy_options=dict(settings.policy_options),
        scheduler=scheduler,
        power_meter=meter,
    )
    metrics.set_build(_version(), settings.model_name, policy.name)
    for bits in servable:
        metrics.backend_info.labels(bits=str(bits), backend=runtime.backend(bits)).set(1)
    if settings.slo_ms is not None:
        metrics.slo.set(settings.slo_ms / 1e3)
    _update_power(runtime)
    return runtime


def _update_budget(runtime: Runtime, options: Mapping[str, Any]) -> None:
    """A new policy's ``budget_w`` reaches the meter (keeping its energy history)."""
    meter = runtime.power_meter
    meter_settings: Any = getattr(meter, "settings", None)
    if meter_settings is None or not dataclasses.is_dataclass(meter_settings) or isinstance(meter_settings, type):
        return
    raw = options.get("budget_w")
    budget = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) and raw > 0 else None
    meter.settings = dataclasses.replace(meter_settings, budget_w=budget)
    runtime.metrics.power_budget.set(budget or 0.0)


def _update_power(runtime: Runtime) -> None:
    meter = runtime.power_meter
    if meter is None:
        return
    state = meter.state(time.monotonic())
    runtime.metrics.power.labels(source=state.source).set(state.energy_in_window_j / max(state.window_s, 1e-9))
    if state.budget_w is not None:
        runtime.metrics.power_budget.set(state.budget_w)


# --- errors -------------------------------------------------------------------------------------------


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


def _refusal_response(refusal: Refused) -> JSONResponse:
    headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after is not None else None
    return error_response(refusal.status, refusal.message, headers)


def _protocol_error_response(rt: Runtime | None, exc: ProtocolError) -> JSONResponse:
    _count_invalid(rt, exc)
    return error_response(exc.status, exc.message)


def _count_invalid(rt: Runtime | None, exc: ProtocolError) -> None:
    if rt is not None and exc.status not in (404,):
        rt.metrics.requests.labels(outcome="invalid", bits="none").inc()


async def _send_response(send: Send, status: int, content: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """An answer of the infer endpoint, straight to ASGI: the same bytes a Starlette response would send,
    without building one (refusals are most of what a server in overload answers)."""
    head = [(b"content-length", b"%d" % len(content)), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": content})


async def _send_error(send: Send, status: int, message: str, retry_after: int | None = None) -> None:
    headers = [_JSON_CONTENT] if retry_after is None else [(b"retry-after", b"%d" % retry_after), _JSON_CONTENT]
    await _send_response(send, status, orjson.dumps({"error": message}), headers)


async def _receive_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The whole request body from the ASGI ``receive``, refused (413) past ``limit`` bytes."""
    if declared is not None:
        if not declared.isdigit():
            raise ProtocolError(f"Content-Length {declared!r} is not an integer")
        if int(declared) > limit:
            raise ProtocolError(f"request body of {declared} bytes exceeds the limit of {limit} bytes", 413)
    chunks = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise ProtocolError(f"request body exceeds the limit of {limit} bytes", 413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _read_body(request: Request, limit: int) -> bytes:
    return await _receive_body(request.receive, request.headers.get("content-length"), limit)


# --- OpenAPI descriptions of the raw-body endpoints (parsed by hand, see server/protocol.py) -----------

_TENSOR_SCHEMA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "example": INPUT_NAME},
        "datatype": {"type": "string", "enum": ["UINT8", "FP32"]},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "data": {"type": "array", "items": {"type": "number"}},
        "parameters": {"type": "object"},
    },
}
INFER_PATH = "/v2/models/{model_name}/infer"
_HEADER_LENGTH = HEADER_LENGTH.encode()
_JSON_CONTENT = (b"content-type", b"application/json")
_BINARY_CONTENT = (b"content-type", b"application/octet-stream")
_INFER_PATH_RE = re.compile(r"/v2/models/(?P<model_name>[^/]+)/infer")  # what Starlette compiles INFER_PATH to
_INFER_OPENAPI = {
    "summary": "Infer (KServe v2, JSON or binary tensors)",
    "operationId": "infer",
    "parameters": [{"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}}],
    "responses": {
        "200": {"description": "logits, with bits, queue_us, compute_us and batch_size in parameters"},
        "4XX": {"description": '{"error": "..."} naming the problem'},
    },
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "precision": {"oneOf": [{"type": "integer"}, {"type": "string", "enum": ["auto"]}]},
                                "min_bits": {"type": "integer"},
                                "max_bits": {"type": "integer"},
                                "precision_policy": {"type": "string", "enum": ["strict", "best_effort"]},
                                "timeout": {"type": "integer", "description": "microseconds"},
                                "slo_ms": {"type": "number"},
                                "priority": {"type": "integer", "description": "1 is the highest; 0 the default"},
                                "binary_data_output": {"type": "boolean"},
                            },
                        },
                        "inputs": {"type": "array", "items": _TENSOR_SCHEMA},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            }
        },
    },
}
_CLASSIFY_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_POLICY_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["policy"],
                    "properties": {"policy": {"type": "string", "example": "fixed-8"}},
                    "additionalProperties": True,
                }
            }
        },
    }
}


# --- the app ------------------------------------------------------------------------------------------


def create_app(
    settings: Settings, engine: Runner | None = None, profile_data: Mapping[str, Any] | None = None
) -> FastAPI:
    """The app for ``settings``; ``engine`` and ``profile_data`` (a profile dict) replace the artifact's engine
    and the profile file (tests use controllable ones)."""
    prepared = build_runtime(settings, engine, profile_data)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.runtime = prepared
        prepared.scheduler.start()
        prepared.started = True
        try:
            yield
        finally:
            prepared.draining = True
            await prepared.scheduler.drain()

    app = _App(title="apserve", version=_version(), lifespan=lifespan)
    _add_error_handlers(app)
    _add_infer_route(app)
    _add_v2_routes(app)
    _add_v1_routes(app)
    return app


class _App(FastAPI):
    """FastAPI, with ``POST /v2/models/{name}/infer`` dispatched straight to its endpoint, ahead of the
    middleware stack and the router: at low load their per-request Python (five middleware layers, route
    matching, Request/Response objects) cost more than the rest of the server's work on a request. The
    endpoint answers every outcome itself, so skipping those layers changes no response. Other methods
    on that path, a root path, or a request before start-up take the ordinary stack (where the same
    endpoint is registered as a route)."""

    infer_endpoint: _InferEndpoint | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.infer_endpoint
        if endpoint is not None and scope["type"] == "http" and scope["method"] == "POST" and not scope["root_path"]:
            match = _INFER_PATH_RE.fullmatch(scope["path"])
            if match is not None and endpoint.runtime is not None:
                scope["app"] = self
                scope["path_params"] = match.groupdict()
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _check_model(rt: Runtime, name: str) -> None:
    if name != rt.settings.model_name:
        raise ProtocolError(f"unknown model {name!r}; this server serves {rt.settings.model_name!r}", 404)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
        return _protocol_error_response(getattr(request.app.state, "runtime", None), exc)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return _refusal_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(400, problems or "invalid request")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")


def _model_metadata(rt: Runtime) -> dict[str, Any]:
    bits = []
    for b in rt.servable:
        latency = {str(n): round(1e3 * rt.profile.table[(k, n)], 4) for (k, n) in sorted(rt.profile.table) if k == b}
        bits.append({"bits": b, "accuracy": rt.accuracy.get(b), "latency_ms": latency, "backend": rt.backend(b)})
    return {
        "name": rt.settings.model_name,
        "versions": ["1"],
        "platform": "apserve",
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, 784]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, 10]}],
        "parameters": {
            "input_datatypes": ["UINT8", "FP32"],
            "input_shapes": [[-1, 784], [-1, 1, 28, 28]],
            "labels": rt.artifact.labels,
            "default_bits": rt.settings.default_bits,
            "policy": rt.policy_name,
            "profile": rt.profile_source,
        },
        "servable_bits": bits,
    }


def _model_config(rt: Runtime) -> dict[str, Any]:
    s = rt.settings
    return {
        "name": s.model_name,
        "platform": "apserve",
        "backend": "apserve",
        "max_batch_size": s.max_batch_size,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_UINT8", "format": "FORMAT_NONE", "dims": [784]}],
        "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [10]}],
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(s.max_queue_delay_ms * 1000),
            "priority_levels": s.priority_levels,
            "default_priority_level": s.default_priority,
            "default_queue_policy": {"max_queue_size": s.max_queue_size},
        },
    }


class _InferEndpoint:
    """``POST /v2/models/{model_name}/infer``, the hot path, as a plain ASGI app: no FastAPI parameter
    machinery, no Request/Response objects. It answers every outcome itself, errors included (the same
    bodies and metrics as the app's exception handlers), so ``_App`` may call it ahead of the middleware."""

    def __init__(self, app: FastAPI):
        self.app = app

    @property
    def runtime(self) -> Runtime | None:
        return getattr(self.app.state, "runtime", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt: Runtime = self.app.state.runtime
        received = time.monotonic()
        try:
            content, headers, outcome = await self._infer(rt, scope, receive, received)
        except ClientDisconnect:
            return  # nobody to answer
        except ProtocolError as exc:
            _count_invalid(rt, exc)
            await _send_error(send, exc.status, exc.message)
            return
        except Refused as exc:
            await _send_error(send, exc.status, exc.message, exc.retry_after)
            return
        except Exception as exc:  # our bug: the same answer as the app's handler for unhandled errors
            log.exception("unhandled error on POST %s", scope["path"])
            await _send_error(send, 500, f"internal error: {type(exc).__name__}")
            return
        await _send_response(send, 200, content, headers)
        rt.scheduler.answer_sent(outcome)

    async def _infer(
        self, rt: Runtime, scope: Scope, receive: Receive, received: float
    ) -> tuple[bytes, list[tuple[bytes, bytes]], Outcome]:
        _check_model(rt, scope["path_params"]["model_name"])
        declared = header_length = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = value.decode("latin-1")
            elif name == _HEADER_LENGTH:
                header_length = value.decode("latin-1")
        body = await _receive_body(receive, declared, rt.settings.max_body_bytes)
        parsed = parse_infer(
            body,
            header_length,
            max_batch_size=rt.settings.max_batch_size,
            priority_levels=rt.settings.priority_levels,
        )
        outcome = await rt.scheduler.submit(parsed.images, parsed.options, received)
        params = {
            "bits": outcome.bits,
            "queue_us": outcome.queue_us,
            "compute_us": outcome.compute_us,
            "batch_size": outcome.batch_size,
        }
        content, extra = encode_infer_response(
            rt.settings.model_name, parsed.id, outcome.logits, params, parsed.binary_output
        )
        headers = [_BINARY_CONTENT if parsed.binary_output else _JSON_CONTENT]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        return content, headers, outcome


def _add_infer_route(app: _App) -> None:
    """The hot path: ``_App`` calls the endpoint directly; it is also a route (matched first) for the
    requests ``_App`` leaves to the stack. Its OpenAPI description is added to the schema by hand."""
    endpoint = _InferEndpoint(app)
    app.infer_endpoint = endpoint
    app.router.routes.insert(0, Route(INFER_PATH, endpoint, methods=["POST"]))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema["paths"][INFER_PATH] = {"post": _INFER_OPENAPI}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_v2_routes(app: FastAPI) -> None:
    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "apserve", "version": _version(), "extensions": ["binary_tensor_data", "model_configuration"]}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(request: Request) -> Response:
        rt = _runtime(request)
        ok = rt.started and not rt.draining
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{model_name}")
    async def model_metadata(model_name: str, request: Request) -> dict[str, Any]:
        rt = _runtime(request)
        _check_model(rt, model_name)
        return _model_metadata(rt)

    @app.get("/v2/models/{model_name}/versions/{version}")
    async def model_version_metadata(model_name: str, version: str, request: Request) -> dict[str, Any]:
        rt = _runtime(request)
        _check_model(rt, model_name)
        if version != "1":
            raise ProtocolError(f"unknown version {version!r} of {model_name!r}; only '1' exists", 404)
        return _model_metadata(rt)

    @app.get("/v2/models/{model_name}/ready")
    async def model_ready(model_name: str, request: Request) -> Response:
        rt = _runtime(request)
        _check_model(rt, model_name)
        ok = rt.started and not rt.draining
        return JSONResponse({"name": model_name, "ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{model_name}/config")
    async def model_config(model_name: str, request: Request) -> dict[str, Any]:
        rt = _runtime(request)
        _check_model(rt, model_name)
        return _model_config(rt)


def _decode_image(data: bytes) -> tuple[np.ndarray, bool]:
    """Any PNG/JPEG -> uint8 [1, 784] grayscale 28x28, light object on dark ground as Fashion-MNIST;
    returns the pixels and whether they were inverted (a dark object on a light ground)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ("PNG", "JPEG"):
                raise ProtocolError(f"image format {image.format} is not supported; send PNG or JPEG")
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ProtocolError(f"image of {width}x{height} pixels is too large", 413)
            gray = image.convert("L").resize((28, 28), Image.Resampling.BOX)
            pixels = np.asarray(gray, dtype=np.uint8)
    except ProtocolError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ProtocolError(f"the upload is not a decodable PNG or JPEG image: {exc}") from None
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    inverted = bool(border.mean() > 127)
    if inverted:
        pixels = 255 - pixels
    return pixels.reshape(1, 784), inverted


def _check_admin(rt: Runtime, request: Request) -> None:
    token = rt.settings.admin_token
    if token is None:
        raise ProtocolError("the admin API is disabled: set APSERVE_ADMIN_TOKEN to enable it", 404)
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise StarletteHTTPException(
            401, "missing bearer token (Authorization: Bearer ...)", {"WWW-Authenticate": "Bearer"}
        )
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise StarletteHTTPException(403, "wrong admin token")


def _add_v1_routes(app: FastAPI) -> None:
    @app.post("/v1/classify", openapi_extra=_CLASSIFY_OPENAPI)
    async def classify(
        request: Request,
        precision: str | None = Query(None, description="1..8, 32 or auto"),  # noqa: B008
    ) -> dict[str, Any]:
        rt = _runtime(request)
        limit = rt.settings.max_body_bytes
        options = parse_request_options(
            {"precision": precision} if precision else None, priority_levels=rt.settings.priority_levels
        )
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            body = await _read_body(request, limit)
            data = await _form_file(request, body)
        else:
            data = await _read_body(request, limit)
        if not data:
            raise ProtocolError("empty upload: send a PNG or JPEG as the body or as the form field 'file'")
        pixels, inverted = await run_in_threadpool(_decode_image, data)
        outcome = await rt.scheduler.submit(pixels, options)
        z = outcome.logits[0] - outcome.logits[0].max()
        probs = np.exp(z) / np.exp(z).sum()
        top = np.argsort(-probs)[:5]
        labels = rt.artifact.labels
        return {
            "model_name": rt.settings.model_name,
            "bits": outcome.bits,
            "top5": [{"label": labels[i], "probability": round(float(probs[i]), 6)} for i in top],
            "inverted": inverted,
            "queue_us": outcome.queue_us,
            "compute_us": outcome.compute_us,
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        rt = _runtime(request)
        rt.scheduler.account_finished()
        _update_power(rt)
        return Response(rt.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/policy")
    async def get_policy(request: Request) -> dict[str, Any]:
        rt = _runtime(request)
        _check_admin(rt, request)
        return {"policy": rt.policy_name, "options": rt.policy_options}

    @app.put("/v1/policy", openapi_extra=_POLICY_OPENAPI)
    async def put_policy(request: Request) -> dict[str, Any]:
        rt = _runtime(request)
        _check_admin(rt, request)
        body = await _read_body(request, 64 * 1024)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"policy body is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("policy"), str):
            raise ProtocolError('body must be a JSON object {"policy": NAME, ...settings}', 422)
        name = data.pop("policy")
        try:
            policy: Policy = build_policy(name, data)
        except PolicyError as exc:
            raise ProtocolError(f"invalid policy: {exc}", 422) from None
        except (TypeError, ValueError) as exc:  # a builder rejecting a setting's type
            raise ProtocolError(f"invalid settings for policy {name!r}: {exc}", 422) from None
        async with rt.policy_lock:
            previous = rt.policy_name
            _update_budget(rt, data)
            rt.scheduler.set_policy(policy)
            rt.policy_name, rt.policy_options = policy.name, data
            rt.metrics.set_build(_version(), rt.settings.model_name, policy.name)
        log.info("policy changed from %s to %s %s", previous, policy.name, data)
        return {"policy": policy.name, "options": data, "previous": previous}


async def _form_file(request: Request, body: bytes) -> bytes:
    """The 'file' field of a multipart upload (the body was already read within the size limit)."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(request.headers, stream()).parse()
    except MultiPartException as exc:
        raise ProtocolError(f"malformed multipart upload: {exc.message}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ProtocolError("multipart upload needs a file field named 'file'")
    data = await upload.read()
    await form.close()
    return data
