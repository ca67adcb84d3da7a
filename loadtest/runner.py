"""`apserve loadtest`: Locust headless against a server (one it starts, or --url), then a report.

Everything talks HTTP: the server is a subprocess (`apserve serve`), Locust is a subprocess
(`python -m locust -f loadtest/locustfile.py`), and /metrics is scraped while the load runs. Never
imports server.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest import report as report_mod
from loadtest.protocol import number_mix, precision_mix
from loadtest.shapes import SHAPES, build_shape

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
REPO_ROOT = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_S = 30


class LoadtestError(RuntimeError):
    """The load test could not run; the message says why."""


@dataclass
class LoadtestOptions:
    shape: str = "spike"
    policy: str = "slo"
    url: str | None = None
    duration_s: float = 60.0
    out: Path = Path("runs/loadtest")
    base_rps: float = 20.0
    peak_rps: float | None = None
    steps: int = 4
    trace: Path | None = None
    user_rps: float = 5.0
    users: int = 8  # closed loop (user_rps 0)
    precision_mix: str = "auto"
    slo_mix: str = "50"
    priority_mix: str = "0"
    batch: int = 1
    model: str = "fashion-resnet"
    slo_gate: float = 0.0
    scrape_interval_s: float = 1.0  # 0: only a scrape before and after (energy)
    server_cpus: str | None = None  # taskset list for the server we start, e.g. "0"
    load_cpus: str | None = None  # taskset list for Locust (and this process), e.g. "1"
    server_env: dict[str, str] = field(default_factory=dict)  # extra APSERVE_* for the server we start
    server_start_timeout_s: float = 120.0
    plots: bool = True
    seed: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _taskset(cpus: str | None) -> list[str]:
    if not cpus:
        return []
    if shutil.which("taskset") is None:
        raise LoadtestError("pinning to CPUs needs `taskset` (util-linux)")
    return ["taskset", "-c", cpus]


def _apserve_command() -> list[str]:
    exe = Path(sys.executable).with_name("apserve")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (our own server)
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Server:
    """`apserve serve` as a subprocess on a loopback port; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, policy: str, log: Path, cpus: str | None, env: Mapping[str, str], port: int = 0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        server_env = {k: v for k, v in os.environ.items() if not k.startswith("LOADTEST_")}
        server_env.update({"APSERVE_HOST": "127.0.0.1", "APSERVE_PORT": str(self.port), "APSERVE_POLICY": policy})
        server_env.update(env)
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*_taskset(cpus), *_apserve_command(), "serve"],
            env=server_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
        self.log_path = log

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LoadtestError(f"apserve serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if get(f"{self.url}/v2/health/ready", timeout=1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise LoadtestError(f"apserve serve not ready after {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def scrape(url: str) -> dict[str, float]:
    """The gauges and counters the report uses, from one GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    _, body = get(f"{url}/metrics")
    values: dict[str, float] = {"t": time.time()}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            name = sample.name.removeprefix("apserve_")
            if name in ("served_accuracy", "power_budget_watts", "queue_depth", "energy_joules_total"):
                values[name] = sample.value
            elif name == "power_watts":
                values[name] = max(values.get(name, 0.0), sample.value)
            elif name in ("engine_cpu_seconds_total", "engine_profiled_seconds_total"):  # summed over bits
                values[name] = values.get(name, 0.0) + sample.value
            elif name in (
                "batch_gap_seconds_sum",
                "batch_gap_seconds_count",
                "process_cpu_seconds_total",
                "worker_cpu_seconds_total",
            ):
                values[name] = sample.value
            elif name in ("requests_total", "batches_total"):  # requests: every outcome the front end handled
                values[name] = values.get(name, 0.0) + sample.value
    return values


class Scraper(threading.Thread):
    """Scrapes /metrics every `interval_s` (as Prometheus would) while the load runs."""

    def __init__(self, url: str, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.interval_s = url, interval_s
        self.samples: list[dict[str, float]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            with contextlib.suppress(OSError, ValueError):  # a missed scrape is a gap in the plot
                self.samples.append(scrape(self.url))

    def stop(self) -> None:
        self._done.set()
        self.join()


def accuracy_per_bits(url: str, model: str) -> dict[int, float]:
    """Accuracy per bits from the model metadata (GET /v2/models/{name}); {} if it does not say."""
    try:
        status, body = get(f"{url}/v2/models/{model}")
        meta = json.loads(body) if status == 200 else {}
    except (OSError, ValueError):
        return {}
    found: dict[int, float] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "bits" in node and "accuracy" in node and isinstance(node["accuracy"], int | float):
                found[int(node["bits"])] = float(node["accuracy"])
            elif isinstance(node.get("accuracy"), dict):
                for k, v in node["accuracy"].items():
                    if str(k).isdigit() and isinstance(v, int | float):
                        found[int(k)] = float(v)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(meta)
    # a percentage table (e.g. 91.2) becomes a fraction like `apserve eval --json`
    return {b: a / 100 if a > 1 else a for b, a in found.items()}


def _locust_env(opts: LoadtestOptions, log: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.update(
        {
            "LOADTEST_MODEL": opts.model,
            "LOADTEST_BATCH": str(opts.batch),
            "LOADTEST_PRECISION_MIX": opts.precision_mix,
            "LOADTEST_SLO_MIX": opts.slo_mix,
            "LOADTEST_PRIORITY_MIX": opts.priority_mix,
            "LOADTEST_USER_RPS": str(opts.user_rps),
            "LOADTEST_USERS": str(opts.users),
            "LOADTEST_SHAPE": opts.shape,
            "LOADTEST_DURATION_S": str(opts.duration_s),
            "LOADTEST_BASE_RPS": str(opts.base_rps),
            "LOADTEST_PEAK_RPS": "" if opts.peak_rps is None else str(opts.peak_rps),
            "LOADTEST_STEPS": str(opts.steps),
            "LOADTEST_TRACE": "" if opts.trace is None else str(opts.trace),
            "LOADTEST_LOG": str(log),
            "LOADTEST_SLO_GATE": str(opts.slo_gate),
            "LOADTEST_SEED": str(opts.seed),
        }
    )
    return env


def validate(opts: LoadtestOptions) -> None:
    """Fail before starting anything when a setting is wrong."""
    if opts.shape not in SHAPES:
        raise LoadtestError(f"unknown shape {opts.shape!r}; choose one of {', '.join(SHAPES)}")
    try:
        build_shape(opts.shape, opts.duration_s, opts.base_rps, opts.peak_rps, opts.steps, opts.trace)
        precision_mix(opts.precision_mix)
        number_mix(opts.slo_mix, "slo_ms")
        number_mix(opts.priority_mix, "priority")
    except ValueError as exc:
        raise LoadtestError(str(exc)) from None
    if opts.user_rps < 0 or opts.users < 1:
        raise LoadtestError(f"user rps must be >= 0 and users >= 1, got {opts.user_rps:g} and {opts.users}")
    if opts.batch < 1:
        raise LoadtestError(f"images per request must be >= 1, got {opts.batch}")
    if not 0 <= opts.slo_gate <= 1:
        raise LoadtestError(f"SLO gate is a fraction in [0, 1], got {opts.slo_gate}")


def run(opts: LoadtestOptions, progress: bool = True) -> dict[str, Any]:
    """Runs the load test and writes report.json (and plots) into opts.out; returns the report."""
    validate(opts)
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "requests.csv"
    say = (lambda msg: print(f"apserve loadtest: {msg}", file=sys.stderr)) if progress else (lambda msg: None)
    if opts.load_cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, _cpu_list(opts.load_cpus))  # the scraper shares the load generator's core
    server = None
    try:
        if opts.url:
            url = opts.url.rstrip("/")
        else:
            say(f"starting apserve serve (policy {opts.policy})")
            server = Server(opts.policy, out / "server.log", opts.server_cpus, opts.server_env)
            server.wait_ready(opts.server_start_timeout_s)
            url = server.url
        accuracy = accuracy_per_bits(url, opts.model)
        before = scrape(url)
        scraper = Scraper(url, opts.scrape_interval_s) if opts.scrape_interval_s > 0 else None
        if scraper:
            scraper.start()
        say(f"{opts.shape} load for {opts.duration_s:g} s against {url}")
        cmd = [
            *_taskset(opts.load_cpus),
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "-H",
            url,
            "--only-summary",
            "--loglevel",
            "WARNING",
            # when the shape ends, requests in flight are still answered and logged (none is lost)
            "--stop-timeout",
            str(STOP_TIMEOUT_S),
        ]
        with open(out / "locust.log", "wb") as locust_log:
            try:
                proc = subprocess.run(
                    cmd,
                    env=_locust_env(opts, log),
                    stdout=locust_log,
                    stderr=subprocess.STDOUT,
                    timeout=opts.duration_s + STOP_TIMEOUT_S + 60,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise LoadtestError(
                    f"locust did not finish in {opts.duration_s + 60:.0f} s; see {out / 'locust.log'}"
                ) from None
        if scraper:
            scraper.stop()
        after = scrape(url)
        if proc.returncode not in (0, 1) or not log.exists():
            raise LoadtestError(f"locust failed with exit code {proc.returncode}; see {out / 'locust.log'}")
        samples = [before, *(scraper.samples if scraper else []), after]
        result = report_mod.summarize(report_mod.read_log(log), accuracy, samples)
    finally:
        if server:
            server.stop()
    result = {
        "shape": opts.shape,
        "policy": opts.policy if server else None,
        "url": None if server else url,
        "duration_s": opts.duration_s,
        "base_rps": opts.base_rps,
        "peak_rps": opts.peak_rps if opts.peak_rps is not None else 3 * opts.base_rps,
        "precision_mix": opts.precision_mix,
        "slo_mix": opts.slo_mix,
        "priority_mix": opts.priority_mix,
        "accuracy_per_bits": {str(b): a for b, a in sorted(accuracy.items())},
        "locust_exit_code": proc.returncode,
        "slo_gate": opts.slo_gate,
        **result,
    }
    if opts.plots:
        result["plots"] = [p.name for p in report_mod.plot(result, out, title=f"({opts.shape}, {opts.policy})")]
    (out / "report.json").write_text(json.dumps(result, indent=1))
    say(
        f"{result['requests']} requests, SLO attainment {_pct(result['slo_attainment'])}, "
        f"p99 {_ms(result['p99_ms'])}, served accuracy {_pct(result['served_accuracy'])}; report in {out}"
    )
    return result


def _cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} ms"


def parse_server_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("APSERVE_"):
            raise LoadtestError(f"--server-env takes APSERVE_NAME=VALUE, got {item!r}")
        env[key] = value
    return env
