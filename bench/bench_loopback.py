"""What a request/response round trip between the two cores costs on this machine, before any HTTP.

A Python TCP echo (300-byte replies to 1,100-byte requests, TCP_NODELAY) on one core and a client on the
other, three ways: the client sleeping in recv between its request and the reply (what any ordinary
client does), the client polling its socket without sleeping, and both on the same core. Optionally the
echo busy-waits ``--work-ms`` before replying, as a server computing would, so that the sleeping client's
core has time to go idle.

    .venv/bin/python bench/bench_loopback.py [--work-ms 2] [--json]

On this VM (session 11, two measurements an hour apart): 105–369 µs median round trip with a sleeping
client, 27–37 µs with a polling one, 20–25 µs on one core; with 2 ms of work, 164–205 µs on top of it
against 78–83 µs. The difference is the sleeping core's wake-up, which a benchmark client charges to the
server it measures (bench/bench_server.py).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time

REQUEST, REPLY = 1100, 300


def serve(port: int, work_s: float) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    print("ready", flush=True)
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        got = 0
        while got < REQUEST:
            data = conn.recv(65536)
            if not data:
                return
            got += len(data)
        deadline = time.perf_counter() + work_s
        while time.perf_counter() < deadline:
            pass
        conn.sendall(b"r" * REPLY)


def round_trips(port: int, polling: bool, count: int) -> list[float]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request, times = b"q" * REQUEST, []
    for _ in range(count):
        start = time.perf_counter()
        sock.sendall(request)
        got = 0
        while got < REPLY:
            try:
                got += len(sock.recv(65536, socket.MSG_DONTWAIT if polling else 0))
            except BlockingIOError:
                continue
        times.append(time.perf_counter() - start)
    sock.close()
    return times[count // 10 :]  # the first tenth warms up


def measure(server_cpu: str, client_cpu: str, polling: bool, work_s: float, count: int, port: int) -> float:
    argv = ["taskset", "-c", server_cpu, sys.executable, __file__, "--serve", str(port), "--work-ms", str(1e3 * work_s)]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        argv = [sys.executable, __file__, "--client", str(port), "--count", str(count)] + (
            ["--polling"] if polling else []
        )
        out = subprocess.run(["taskset", "-c", client_cpu, *argv], capture_output=True, text=True, check=True)
        return float(out.stdout) - work_s
    finally:
        server.kill()
        server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-ms", type=float, default=0.0, help="the echo busy-waits this long before replying")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--polling", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.work_ms / 1e3)
        return 0
    if args.client:
        print(statistics.median(round_trips(args.client, args.polling, args.count)))
        return 0
    work_s = args.work_ms / 1e3
    cases = {
        "cross_core_sleeping_client_us": ("0", "1", False),
        "cross_core_polling_client_us": ("0", "1", True),
        "same_core_sleeping_client_us": ("0", "0", False),
    }
    report: dict[str, float] = {"work_ms": args.work_ms}
    for i, (name, (server_cpu, client_cpu, polling)) in enumerate(cases.items()):
        report[name] = 1e6 * measure(server_cpu, client_cpu, polling, work_s, args.count, args.port + i)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for name, value in report.items():
            print(f"{name:32} {value:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
