"""`apserve loadtest` for real: Locust (a subprocess) against `apserve serve` (a subprocess), a few seconds of load."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.runner import Server

APSERVE = Path(sys.executable).with_name("apserve")
PNG = b"\x89PNG\r\n\x1a\n"


def loadtest(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APSERVE_", "LOADTEST_"))}
    return subprocess.run(
        [str(APSERVE), "loadtest", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = Server("hint", tmp_path_factory.mktemp("server") / "server.log", None, {})
    try:
        server.wait_ready(90)
        yield server.url
    finally:
        server.stop()


def test_loadtest_starts_a_server_and_writes_a_sane_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = loadtest(
        "--shape", "spike", "--policy", "hint", "--duration", "4", "--rps", "10", "--peak-rps", "40",
        "--precision-mix", "1:3,2:1", "--slo-mix", "5000", "--user-rps", "5", "--out", str(out), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    report = json.loads((out / "report.json").read_text())
    assert printed["requests"] == report["requests"] and "timeseries" not in printed
    assert report["shape"] == "spike" and report["policy"] == "hint"
    assert report["requests"] >= 3
    assert sum(report["outcomes"].values()) == report["requests"]
    assert report["outcomes"]["ok"] >= 1 and report["outcomes"]["invalid"] == 0
    assert 0.0 <= report["slo_attainment"] <= 1.0
    assert set(report["bits"]) <= {"1", "2"}  # the hint policy honours the hints
    assert report["p50_ms"] <= report["p99_ms"]
    assert report["energy_j"] is not None and report["energy_j"] >= 0
    # the engine's speed against its profile, per scrape interval, from the server's engine counters
    speeds = [v for v in report["timeseries"]["scrape_engine_speed"] if v is not None]
    assert speeds and all(0.0 < v < 20.0 for v in speeds), speeds
    # and the front end's CPU per request (process_cpu_seconds_total less the engine's): some, under a second
    assert 0.0 < report["front_end_us_per_request"] < 1e6
    # split as the simulator charges it: per request, and the worker's own CPU per batch (some, under a second)
    split = report["front_end_split_us"]
    assert 0.0 <= split["per_request"] <= report["front_end_us_per_request"] and 0.0 < split["per_batch"] < 1e6
    for name in ("latency.png", "bits.png", "throughput.png", "accuracy.png"):
        assert (out / name).read_bytes().startswith(PNG), name
    rows = (out / "requests.csv").read_text().splitlines()
    assert rows[0].startswith("t,latency_ms,status,outcome,bits") and len(rows) == report["requests"] + 1
    # the offered load follows the shape: ~10/s for 1 s, ~40/s for 2 s, ~10/s for 1 s (Poisson: ~20 vs ~80;
    # the users are all there from the start, so the spike is in the rate, not in new connections)
    sent = sorted(float(row.split(",")[0]) for row in rows[1:])
    in_spike = sum(1 for t in sent if 1.0 <= t - sent[0] < 3.0)
    assert in_spike >= 50 and len(sent) - in_spike <= in_spike / 2, (in_spike, len(sent))
    # the server it started was shut down cleanly (uvicorn says so as its last word)
    assert "Finished server process" in (out / "server.log").read_text()


def test_slo_gate_fails_a_run_that_misses_its_slo(server_url: str, tmp_path: Path) -> None:
    # a 0.01 ms SLO cannot be met: every request misses and the gate fails the run (exit code 1)
    out = tmp_path / "gate"
    result = loadtest(
        "--url", server_url, "--shape", "constant", "--duration", "2", "--rps", "3", "--precision-mix", "1",
        "--slo-mix", "0.01", "--slo-gate", "0.99", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "below the SLO gate" in (out / "locust.log").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["requests"] >= 1 and report["slo_attainment"] == 0.0
    assert report["locust_exit_code"] == 1 and report["policy"] is None and report["url"] == server_url


def test_requests_can_carry_several_images(server_url: str, tmp_path: Path) -> None:
    # a client that batches its own images: each request a [4, 1, 28, 28] tensor, answered as one
    out = tmp_path / "images"
    result = loadtest(
        "--url", server_url, "--shape", "constant", "--duration", "2", "--rps", "5", "--images", "4",
        "--precision-mix", "1", "--slo-mix", "5000", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["outcomes"]["ok"] >= 1 and report["outcomes"]["invalid"] == 0
    with (out / "requests.csv").open() as f:
        answered = [row for row in csv.DictReader(f) if row["status"] == "200"]
    assert answered and all(int(row["batch_size"]) >= 4 for row in answered)


def test_bad_settings_are_refused_before_anything_starts(tmp_path: Path) -> None:
    for args, message in [
        (["--shape", "replay"], "needs a trace"),
        (["--precision-mix", "9"], "not one of"),
        (["--slo-gate", "2"], "SLO gate"),
        (["--server-env", "PATH=/"], "APSERVE_NAME=VALUE"),
        (["--images", "0"], "images per request must be >= 1, got 0"),
    ]:
        result = loadtest(*args, "--out", str(tmp_path / "x"), timeout=30)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


_POOLED_CONNECTION_CHECK = """
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if hard != resource.RLIM_INFINITY and hard < 1200:
    sys.exit(3)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
import loadtest.locustfile  # patches the pool's check (and Locust patches sockets for gevent)
from geventhttpclient.connectionpool import ConnectionPool
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
filler = [socket.socket() for _ in range(1100)]
client = socket.create_connection(listener.getsockname())
peer, _ = listener.accept()
alive = ConnectionPool._is_socket_alive
print(client.fileno() > 1023, alive(None, client), end=" ")
peer.sendall(b"x")  # a pooled connection with data to read is not reusable
__import__("time").sleep(0.05)
print(alive(None, client), end=" ")
client.close()
print(alive(None, client))
"""


def test_pooled_connections_past_descriptor_1023_stay_alive() -> None:
    """Locust's HTTP pool checks an idle connection with select(), which fails past descriptor 1023: with
    over ~1,000 users every request then reconnected. The locustfile's check must keep such a connection."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADTEST_")}
    result = subprocess.run(
        [sys.executable, "-c", _POOLED_CONNECTION_CHECK], capture_output=True, text=True, timeout=120, env=env
    )
    if result.returncode == 3:
        pytest.skip("this machine allows fewer than 1,200 open files")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "True", "False", "False"]
