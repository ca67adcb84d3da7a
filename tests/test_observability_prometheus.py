"""A real Prometheus (Debian's) scraping a real `apserve serve` under traffic, all on 127.0.0.1.

Prometheus runs with deploy/prometheus/prometheus.yml and its rules, the target and intervals swapped for
this server and a 1 s scrape. Every Grafana panel's query must come back `success` with data.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loadtest.protocol import encode_infer, request_parameters
from loadtest.runner import Server, free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
SCRAPE_S = 1
RATE_INTERVAL = f"{4 * SCRAPE_S}s"  # Grafana's $__rate_interval is at least 4 scrape intervals

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None, reason="prometheus missing: `make test` installs Debian's prometheus"
)


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"{what}: not true after {timeout_s:.0f} s (last: {last!r})")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def infer(client: httpx.Client, precision: str, **extra: Any) -> httpx.Response:
    params = request_parameters(precision, 0, 0) | extra
    body, headers = encode_infer(bytes(range(256)) * 3 + bytes(16), 1, params)
    return client.post("/v2/models/fashion-resnet/infer", content=body, headers=headers)


class Traffic(threading.Thread):
    """1-bit and 8-bit requests (hint policy), impossible deadlines and malformed requests, until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = httpx.Client(base_url=url, timeout=30)
        self.statuses: dict[int, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.done.is_set():
            for response in (
                infer(self.client, "8" if i % 4 == 0 else "1"),
                infer(self.client, "1", timeout=1),  # 1 µs: refused at once, never computed
                self.client.post("/v2/models/fashion-resnet/infer", json={"inputs": [{"name": "nope"}]}),
            ):
                self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
            i += 1
            self.done.wait(0.05)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=60)
        self.client.close()


@dataclass
class Stack:
    server_url: str
    prometheus: httpx.Client
    traffic: Traffic

    def query(self, expr: str, **params: Any) -> dict[str, Any]:
        path = "/api/v1/query_range" if "start" in params else "/api/v1/query"
        reply = self.prometheus.get(path, params={"query": expr, **params})
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]

    def vector(self, expr: str) -> list[dict[str, Any]]:
        return self.query(expr)["result"]


def prometheus_config(target: str, tmp: Path) -> Path:
    """deploy/prometheus/prometheus.yml with this server as the target and a 1 s scrape."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=f"{SCRAPE_S}s", evaluation_interval=f"{SCRAPE_S}s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / rule) for rule in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("observability")
    prom_port = free_port()
    server = Server("hint", tmp / "server.log", None, {"APSERVE_SLO_MS": "2000"})
    assert PROMETHEUS is not None
    prom_log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115
    prometheus = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={prometheus_config(f'127.0.0.1:{server.port}', tmp)}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--web.enable-lifecycle",
        ],
        stdout=prom_log,
        stderr=subprocess.STDOUT,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{prom_port}", timeout=10)
    traffic = Traffic(server.url)
    try:
        server.wait_ready(90)
        wait_for("prometheus ready", lambda: client.get("/-/ready").is_success)
        traffic.start()
        wait_for(
            "apserve target up",
            lambda: [t for t in client.get("/api/v1/targets").json()["data"]["activeTargets"] if t["health"] == "up"],
        )
        yield Stack(server.url, client, traffic)
    finally:
        traffic.stop()
        client.close()
        stop(prometheus)
        server.stop()
        prom_log.close()


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "apserve.json").read_text())
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def grafana_substitute(expr: str) -> str:
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", f"{SCRAPE_S}s")


def test_prometheus_scrapes_the_server(stack: Stack) -> None:
    up = stack.vector('up{job="apserve"}')
    assert [float(s["value"][1]) for s in up] == [1.0]
    build = stack.vector("apserve_build_info")
    assert build and build[0]["metric"]["policy"] == "hint" and build[0]["metric"]["model"] == "fashion-resnet"


def test_counters_follow_the_traffic(stack: Stack) -> None:
    def bits_served() -> set[str]:
        return {s["metric"]["bits"] for s in stack.vector('apserve_requests_total{outcome="ok"} > 0')}

    assert wait_for("ok requests at 1 and 8 bits", lambda: bits_served() >= {"1", "8"}) is True
    invalid = wait_for(
        "invalid requests counted", lambda: stack.vector('apserve_requests_total{outcome="invalid"} > 0')
    )
    assert float(invalid[0]["value"][1]) >= 1
    refused = wait_for(
        "deadline refusals counted", lambda: stack.vector('apserve_rejections_total{reason="deadline"} > 0')
    )
    assert float(refused[0]["value"][1]) >= 1
    # the client saw the same kinds of answers
    assert stack.traffic.statuses.get(200, 0) >= 2
    assert sum(n for code, n in stack.traffic.statuses.items() if code in (429, 503)) >= 1
    assert sum(n for code, n in stack.traffic.statuses.items() if 400 <= code < 500 and code != 429) >= 1


def test_recording_rules_evaluate_on_real_data(stack: Stack) -> None:
    rates = wait_for("recorded request rate by bits", lambda: stack.vector("apserve:requests:rate1m_by_bits"))
    assert {s["metric"]["bits"] for s in rates} <= {str(b) for b in (1, 2, 3, 4, 5, 6, 7, 8, 32)}
    attainment = wait_for("recorded SLO attainment", lambda: stack.vector("apserve:slo_attainment:ratio_rate5m"))
    value = float(attainment[0]["value"][1])
    assert 0.0 <= value < 1.0  # the impossible deadlines are refused, so some requests miss


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 8

    def empty() -> list[str]:
        now = time.time()
        missing = []
        for title, expr in queries:
            data = stack.query(grafana_substitute(expr), start=now - 10, end=now, step=SCRAPE_S)
            assert data["resultType"] == "matrix"
            if not any(series["values"] for series in data["result"]):
                missing.append(f"{title}: {expr}")
        return missing

    deadline = time.monotonic() + 60
    missing = empty()
    while missing and time.monotonic() < deadline:
        time.sleep(1)
        missing = empty()
    assert not missing, "panels without data:\n" + "\n".join(missing)


def test_metrics_pass_promtool_check_metrics(stack: Stack) -> None:
    body = httpx.get(f"{stack.server_url}/metrics").content
    assert b"apserve_requests_total" in body
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30, check=False)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
