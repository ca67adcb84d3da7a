"""The front end's CPU per request: what the event loop spends on a request, apart from the engine.

`apserve serve` (fixed policy, one worker, one engine thread) pinned to one core, a closed-loop client
with C keep-alive connections on the other, for each kind of request:

- ``binary``: one 1-image UINT8 request with the binary tensor extension, answered (the common case);
- ``json``: the same image as a JSON tensor (784 numbers), answered;
- ``refused``: a binary request whose ``timeout`` (10 µs) no bits can meet, refused at admission (what a
  server in overload answers most).

Reported per kind: requests/s, and CPU µs per request of the event-loop thread (from /proc, over the
measured seconds) and of the whole process. ``--tree DIR`` serves another checkout of apserve (a
``git worktree`` of an older commit, with its native library built) with this venv, so that two versions
can be measured in turn in the same minutes: on this VM the machine's speed swings by 1.5 x within
minutes, so compare runs interleaved, never across hours.

    .venv/bin/python bench/bench_front_end.py --json
    git worktree add /tmp/before REV && cp kernels/_bitserial*.so /tmp/before/kernels/
    for i in 1 2 3; do .venv/bin/python bench/bench_front_end.py --tree /tmp/before; .venv/bin/python bench/bench_front_end.py; done
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_server import _drive, _free_port, _pinned, _wait_ready, cpu_seconds, infer_request  # noqa: E402

KINDS = ("binary", "json", "refused")


def request_bytes(kind: str, port: int) -> bytes:
    return infer_request(
        "127.0.0.1", port, parameters={"timeout": 10} if kind == "refused" else None, json_tensor=kind == "json"
    )


def client_main(port: int, kind: str, connections: int, seconds: float) -> int:
    url, request = f"http://127.0.0.1:{port}", request_bytes(kind, port)
    print(json.dumps(asyncio.run(_drive(url, connections, seconds, 0.0, parse=False, request=request))))
    return 0


def _answered(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("apserve_requests_total{"))


def measure(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "APSERVE_POLICY": args.policy, "APSERVE_WORKERS": "1", "APSERVE_ENGINE_THREADS": "1"}
    env |= {"APSERVE_MAX_QUEUE_SIZE": "512", "APSERVE_LOG_LEVEL": "warning"}
    argv = [sys.executable, "-m", "server.cli", "serve", "--port", str(port)]
    server = subprocess.Popen(_pinned(args.server_cpu, argv), env=env, cwd=args.tree)
    try:
        _wait_ready(url, server)
        pid = server.pid  # taskset execs the server: the same pid, and the event loop is its main thread
        client = [sys.executable, __file__, "--client", str(port), "--kind", kind]
        client += ["--connections", str(args.connections), "--seconds"]
        warm = args.warmup + args.seconds + 1.0
        load = subprocess.Popen(_pinned(args.load_cpu, [*client, str(warm)]), stdout=subprocess.PIPE, text=True)
        time.sleep(args.warmup)
        loop0, all0, n0, t0 = cpu_seconds(pid, pid), cpu_seconds(pid), _answered(url), time.monotonic()
        time.sleep(args.seconds)
        loop1, all1, n1, t1 = cpu_seconds(pid, pid), cpu_seconds(pid), _answered(url), time.monotonic()
        out, _ = load.communicate(timeout=60)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    n = max(1.0, n1 - n0)
    return {
        "requests_per_s": n / (t1 - t0),
        "loop_cpu_us_per_request": 1e6 * (loop1 - loop0) / n,
        "process_cpu_us_per_request": 1e6 * (all1 - all0) / n,
        "client": {k: v for k, v in json.loads(out).items() if k in ("requests", "ok")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--policy", default="fixed-1")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per kind")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the apserve checkout to serve")
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--load-cpu", default="1")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)  # internal: run as the load client
    parser.add_argument("--kind", default="binary", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args.client, args.kind, args.connections, args.seconds)
    report = {"tree": str(args.tree), "policy": args.policy, "connections": args.connections}
    for kind in args.kinds.split(","):
        report[kind] = measure(args, kind)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for kind in args.kinds.split(","):
            r = report[kind]
            print(
                f"{kind:8} {r['requests_per_s']:8.0f} req/s  event loop {r['loop_cpu_us_per_request']:6.1f} us/request"
                f"  process {r['process_cpu_us_per_request']:7.1f} us/request  {r['client']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
