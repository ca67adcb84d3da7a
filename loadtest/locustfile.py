"""Locust load for apserve: binary KServe v2 requests with a mix of precision hints, SLOs and priorities.

    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 [-u N -r R -t 30s]

`apserve loadtest` runs this for you and turns the per-request log into a report with plots.
Settings, all optional (environment):
  LOADTEST_MODEL           model name (fashion-resnet)
  LOADTEST_BATCH           images per request (1)
  LOADTEST_PRECISION_MIX   weighted precision hints, "auto" = none: "auto:8,1:1,8:1" (auto)
  LOADTEST_SLO_MIX         weighted slo_ms values, 0 = none: "50:3,200:1" (50)
  LOADTEST_PRIORITY_MIX    weighted priorities, 0 = default: "1:1,2:4" (0)
  LOADTEST_USER_RPS        most requests/s per user, a Poisson schedule per user; 0 = closed loop (5)
  LOADTEST_USERS           users in closed loop (8)
  LOADTEST_SHAPE           constant | step | spike | diurnal | replay; unset: plain -u/-r/-t
  LOADTEST_DURATION_S, LOADTEST_BASE_RPS, LOADTEST_PEAK_RPS, LOADTEST_STEPS, LOADTEST_TRACE   the shape
  LOADTEST_LOG             CSV file: one row per request (what the report is computed from)
  LOADTEST_SLO_GATE        fail (exit code 1) when SLO attainment is below this fraction (0 = off)
Attainment: a request counts when answered 200 within its slo_ms (no slo_ms: any 200 counts).
Locust's own summary lists refusals (429, 503) as "infer: refused" and expiries (504) as "infer: expired",
not as failures: they are the server's admission control answering as designed (the report counts them
as misses). Failures are invalid requests, server errors and transport errors.
"""

from __future__ import annotations

import csv
import functools
import gc
import os
import random
import select
import sys
import time
from urllib.parse import urlsplit

import gevent
import gevent.monkey
from geventhttpclient import HTTPClient
from geventhttpclient.connectionpool import ConnectionPool
from locust import LoadTestShape, User, events, task

from loadtest.protocol import IMAGE_BYTES, decode_infer, encode_infer, number_mix, precision_mix, request_parameters
from loadtest.shapes import shape_from_env

ENV = os.environ
MODEL = ENV.get("LOADTEST_MODEL", "fashion-resnet")
BATCH = int(ENV.get("LOADTEST_BATCH", "1"))
PRECISION = precision_mix(ENV.get("LOADTEST_PRECISION_MIX", "auto"))
SLO = number_mix(ENV.get("LOADTEST_SLO_MIX", "50"), "slo_ms")
PRIORITY = number_mix(ENV.get("LOADTEST_PRIORITY_MIX", "0"), "priority")
USER_RPS = float(ENV.get("LOADTEST_USER_RPS", "5"))
SLO_GATE = float(ENV.get("LOADTEST_SLO_GATE", "0"))
SHAPE = shape_from_env(ENV)
CLOSED_LOOP_USERS = int(ENV.get("LOADTEST_USERS", "8"))
SPAWN_RATE = 10_000  # the whole pool appears at the start
# Open loop with a shape: a fixed pool sized for the top rate, each user's Poisson schedule thinned by
# rate(t) / top rate, so the offered load follows the shape over connections opened at the base rate.
# (Spawning users at the spike's onset would also spike new connections and the load generator's own
# CPU, a different experiment: it cost ~1 % of all requests at the onset, client- and server-side.)
POOL = SHAPE.pool_size(USER_RPS) if SHAPE is not None and USER_RPS > 0 else 0
USER_TOP_RPS = SHAPE.top_rate / POOL if SHAPE is not None and POOL else USER_RPS
# After the shape's last arrival, the users stay (idle) this long before Locust stops them: stopping a
# pool costs the load generator's CPU, which would otherwise delay reading the last replies.
DRAIN_S = 2.0
TIMEOUT_S = 60.0  # connect and read timeouts of a request
STATS_NAME = {"ok": "infer", "rejected": "infer: refused", "timeout": "infer: expired"}  # in Locust's stats
_started = time.monotonic()

LOG_FIELDS = [
    "t",
    "latency_ms",
    "status",
    "outcome",
    "bits",
    "slo_ms",
    "precision",
    "priority",
    "queue_us",
    "compute_us",
    "batch_size",
]
_rng = random.Random(int(ENV.get("LOADTEST_SEED", "0")))
_images = [bytes(_rng.randrange(256) for _ in range(IMAGE_BYTES * BATCH)) for _ in range(16)]
_c_poll = gevent.monkey.get_original("select", "poll")
_tally = {"sent": 0, "good": 0}
_log_file = open(ENV["LOADTEST_LOG"], "w", newline="") if ENV.get("LOADTEST_LOG") else None  # noqa: SIM115
_log = csv.writer(_log_file) if _log_file else None
if _log:
    _log.writerow(LOG_FIELDS)


def _socket_alive(self: ConnectionPool, sock: gevent.socket.socket | None) -> bool:
    """geventhttpclient's check of an idle pooled connection (open, nothing to read), with poll() in place
    of its select(): select() raises for descriptors past 1023, which the pool takes for a dead
    connection, so with a pool of more than ~1,000 users nearly every request opened a new one (measured:
    7,500 connections for 16,400 requests with 1,800 users, 618 for 16,800 with 600). The C poll, not
    gevent's: a zero timeout never blocks, and gevent's poll object cost ~10 % of the load generator's
    CPU at 1,500 requests/s (py-spy)."""
    try:
        if sock is None or sock.fileno() < 0:
            return False
        poller = _c_poll()
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


if hasattr(ConnectionPool, "_is_socket_alive"):
    ConnectionPool._is_socket_alive = _socket_alive  # type: ignore[method-assign]


def _outcome(status: int) -> str:
    if status == 200:
        return "ok"
    if status in (429, 503):
        return "rejected"
    if status == 504:
        return "timeout"
    if 400 <= status < 500:
        return "invalid"
    return "error"


@functools.cache
def _request(image: int, precision: str, slo_ms: float, priority: int) -> tuple[bytes, dict[str, str]]:
    """Body and headers of one request, encoded once: the mixes are small sets, and encoding each request
    anew (a JSON dump) was ~12 % of the load generator's CPU."""
    return encode_infer(_images[image], BATCH, request_parameters(precision, slo_ms, priority))


@events.test_start.add_listener
def _start_clock(**_kwargs) -> None:
    global _started
    # the load generator must not stall either: a full collection over Locust's import-time objects
    # takes tens of ms here, added to the latency of every request in flight (see server/serve.py)
    gc.freeze()
    _started = time.monotonic()


class Failure(Exception):
    """A request that failed (for Locust's stats): invalid, a server error, or no reply."""


class InferUser(User):
    """One client: a Poisson schedule of at most USER_RPS requests/s following the shape (it catches up
    when a reply was slow). It sends on one keep-alive connection with geventhttpclient's HTTPClient and
    reports every request to Locust's stats itself, Locust's way for a custom client. FastHttpUser's
    session wraps each request in a URL parse, a cookie jar, a redirect check and an exception for every
    status >= 400, and at the spike's peak took most of the load generator's core."""

    path = f"/v2/models/{MODEL}/infer"

    def on_start(self) -> None:
        url = urlsplit(str(self.host))
        self._http = HTTPClient(
            url.hostname or "127.0.0.1",
            url.port or 80,
            concurrency=1,
            connection_timeout=TIMEOUT_S,
            network_timeout=TIMEOUT_S,
        )
        self._rng = random.Random(_rng.random())
        self._next = time.monotonic()
        if USER_RPS > 0:  # Locust runs the task right after on_start: wait here for the first arrival
            self._advance()
            gevent.sleep(max(0.0, self._next - time.monotonic()))

    def on_stop(self) -> None:
        self._http.close()

    def _advance(self) -> None:
        """The next arrival: candidates at the user's top rate, each kept with probability rate(t) / top."""
        while True:
            self._next += self._rng.expovariate(USER_TOP_RPS)
            if SHAPE is None:
                return
            t = self._next - _started
            if t >= SHAPE.duration_s:  # the shape is over: idle until Locust stops the pool
                self._next = _started + SHAPE.duration_s + 10 * DRAIN_S
                return
            if self._rng.random() * SHAPE.top_rate < SHAPE.rate(t):
                return

    def wait_time(self) -> float:
        if USER_RPS <= 0:
            return 0.0
        self._advance()
        return max(0.0, self._next - time.monotonic())

    @task
    def infer(self) -> None:
        precision = PRECISION.pick(self._rng)
        slo_ms = float(SLO.pick(self._rng))
        priority = int(float(PRIORITY.pick(self._rng)))
        body, headers = _request(self._rng.randrange(len(_images)), precision, slo_ms, priority)
        start, started = time.time(), time.perf_counter()
        status, content, error = 0, b"", None
        try:
            response = self._http.request("POST", self.path, body=body, headers=headers)
            status, content, reply_headers = response.status_code, bytes(response.read()), response.info()
        except Exception as exc:  # no reply: refused connection, timeout, closed socket
            error = Failure(f"no reply: {exc!r}")
        latency_ms = 1e3 * (time.perf_counter() - started)
        outcome = "error" if error else _outcome(status)
        params: dict = {}
        if outcome == "ok":
            try:
                params = decode_infer(content, reply_headers).get("parameters") or {}
            except ValueError as exc:
                outcome, error = "error", Failure(f"unreadable v2 reply: {exc}")
        elif outcome in ("invalid", "error") and error is None:
            error = Failure(f"{status} {outcome}")
        self.environment.events.request.fire(
            request_type="POST",
            name=STATS_NAME.get(outcome, "infer"),
            response_time=latency_ms,
            response_length=len(content),
            exception=error,
            context={},
            response=None,
            url=self.path,
        )
        _tally["sent"] += 1
        if outcome == "ok" and (slo_ms <= 0 or latency_ms <= slo_ms):
            _tally["good"] += 1
        if _log:
            _log.writerow(
                [
                    f"{start:.4f}",
                    f"{latency_ms:.3f}",
                    status,
                    outcome,
                    params.get("bits", ""),
                    slo_ms,
                    precision,
                    priority,
                    params.get("queue_us", ""),
                    params.get("compute_us", ""),
                    params.get("batch_size", ""),
                ]
            )


class _EnvShape(LoadTestShape):
    """Users over time from LOADTEST_SHAPE (loadtest/shapes.py); active only when that shape is chosen."""

    abstract = True

    def tick(self) -> tuple[int, float] | None:
        assert SHAPE is not None
        t = self.get_run_time()
        if USER_RPS <= 0:  # closed loop: a fixed number of users, each sending as fast as replies come
            return (CLOSED_LOOP_USERS, SPAWN_RATE) if t < SHAPE.duration_s else None
        return (POOL, SPAWN_RATE) if t < SHAPE.duration_s + DRAIN_S else None


_chosen = SHAPE.name if SHAPE else ""


class ConstantShape(_EnvShape):
    abstract = _chosen != "constant"


class StepShape(_EnvShape):
    abstract = _chosen != "step"


class SpikeShape(_EnvShape):
    abstract = _chosen != "spike"


class DiurnalShape(_EnvShape):
    abstract = _chosen != "diurnal"


class ReplayShape(_EnvShape):
    abstract = _chosen != "replay"


@events.quitting.add_listener
def _slo_gate(environment, **_kwargs) -> None:
    """Exit code: 0 when attainment >= LOADTEST_SLO_GATE, 1 below it, 2 when nothing was answered."""
    if _log_file:
        _log_file.close()
    sent, good = _tally["sent"], _tally["good"]
    attainment = good / sent if sent else 0.0
    print(f"apserve loadtest: {sent} requests, SLO attainment {100 * attainment:.2f} %", file=sys.stderr)
    if sent == 0:
        environment.process_exit_code = 2
    elif attainment < SLO_GATE:
        print(f"apserve loadtest: below the SLO gate of {100 * SLO_GATE:.2f} %", file=sys.stderr)
        environment.process_exit_code = 1
    else:
        environment.process_exit_code = 0
