"""The headline experiment: a load spike through real HTTP under fixed-8, fixed-1, slo and power.

    .venv/bin/python bench/experiment_spike.py            # about 5 minutes; results into docs/
    .venv/bin/python bench/experiment_spike.py --duration 20 --policies fixed-8,slo   # quicker

1. Capacity: fixed-8 saturated by closed-loop Locust users (images/s answered). Calibration, before
   each policy's run (3.): fixed-1 saturated the same way for 10 s; the core time spent neither in the
   engine nor in the worker's own work, per answered request, is what HTTP costs on the server's core, and
   the worker's CPU outside the engine per batch (apserve_worker_cpu_seconds_total) what the scheduler
   costs per batch. The simulator takes both (--request-cost-us, --batch-cost-us); the servers measure their
   effect themselves (observed / profiled batch latency, Snapshot.latency_scale). The same run gives the
   server's mean batch gap and answer delay, which the simulator also takes (--batch-gap-us,
   --answer-delay-us), and the part of the client's latency the server cannot see (reading before the
   request reaches the app, writing after it, the load generator's own delay): its p90 becomes the
   ``margin_ms`` of slo and power; and the machine's speed then (the engine's CPU time over the profiled
   time of the same batches).
2. The spike (issue 5's shape, shortened): 0.5x capacity, 3x for the middle half, back to 0.5x, Poisson
   arrivals, every request with slo_ms. The same arrivals are written as a trace for `apserve simulate`.
   With --images N every request, in every step, carries N images (a [N, 1, 28, 28] tensor) and the
   capacity is in requests of N images: the same images per second in N times fewer requests, for a
   machine whose load generator or front end cannot send or parse the single-image peak.
3. Each policy: a fresh `apserve serve` pinned to core 0 (one engine thread), Locust pinned to core 1.
   SLO attainment, served accuracy, p50/p99, refused, energy; then `apserve simulate` on the same trace,
   three times: at the machine speed the calibration (1.) measured just before (its engine CPU time over
   its profiled time; the prediction), as profiled, and replaying how fast the machine ran during that
   policy's run (the server's engine CPU time over its profiled time, per 1 s scrape: machine-speed.csv,
   policies.machine_speed) with the front end's costs that run measured (the server's CPU time outside the
   engine, process_cpu_seconds_total, split per request and per batch as in 1.). The first two are predictions, made from what was
   known before the run; the third separates the model of the server from the VM's speed swings.
   With --rounds N, 3. runs N times in turn, calibrations included (the trace stays the one drawn from
   the first capacity), and the medians of the attainments per policy are printed beside every round's:
   on this VM one run of a policy at the peak can land 30 points from the next.
4. /metrics overhead: fixed-8 saturated with and without a 1 s scrape, alternated on one server; and the
   server's CPU time per scrape (/proc/PID/stat over 200 scrapes).

Writes docs/img/spike_*.png and docs/experiment_spike.json, and prints the table for docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_server import cpu_seconds  # noqa: E402
from kernels import profiler  # noqa: E402
from loadtest.runner import LoadtestOptions, Server, get, run  # noqa: E402
from loadtest.shapes import arrivals, build_shape, write_trace  # noqa: E402
from model_store import artifact  # noqa: E402
from policies.machine_speed import MachineSpeed, write_csv  # noqa: E402
from policies.slo import SloPolicy  # noqa: E402

SERVER_CPU, LOAD_CPU = "0", "1"
USERS = 600  # Locust users through the spike: the peak's rate x the slowest replies (~200 ms), and more
IDLE_W = 5.0  # the server's power model default (APSERVE_POWER_IDLE_W)
SLO_DEFAULT_MARGIN_MS = SloPolicy.margin_ms  # slo's own default, when nothing is measured


def server_env(slo_ms: float, profile: Path | None) -> dict[str, str]:
    env = {"APSERVE_ENGINE_THREADS": "1", "APSERVE_WORKERS": "1", "APSERVE_SLO_MS": f"{slo_ms:g}"}
    if profile is not None:
        env["APSERVE_PROFILE_PATH"] = str(profile)
    return env


def make_profile(path: Path) -> None:
    """Latency per (bits, batch) with one thread on the server's core: what the policies plan with."""
    cmd = ["taskset", "-c", SERVER_CPU, str(Path(sys.executable).with_name("apserve")), "profile", "--threads", "1"]
    cmd += ["--batches", "1,2,4,8,16,32", "--check-images", "200", "--out", str(path)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    chosen_backend_rows(path)


def chosen_backend_rows(path: Path) -> None:
    """Keep the rows of the backend chosen per bits: the profiler lists every backend it tried, the
    server's parser takes one row per (bits, batch)."""
    profile = json.loads(path.read_text())
    chosen = profile["backends"]
    profile["rows"] = [r for r in profile["rows"] if chosen.get(str(r["bits"])) == r["backend"]]
    path.write_text(json.dumps(profile, indent=1))


def closed_loop(out: Path, policy: str, seconds: float, users: int, images: int, **kw: Any) -> dict[str, Any]:
    opts = LoadtestOptions(
        shape="constant",
        policy=policy,
        duration_s=seconds,
        out=out,
        base_rps=1.0,
        user_rps=0.0,
        users=users,
        slo_mix="0",
        load_cpus=LOAD_CPU,
        server_cpus=SERVER_CPU,
        plots=False,
        batch=images,
        **kw,
    )
    return run(opts, progress=False)


SERVER_TOTALS = {
    "engine_cpu_s": "apserve_engine_cpu_seconds_total",
    "gap_s": "apserve_batch_gap_seconds_sum",
    "gaps": "apserve_batch_gap_seconds_count",
    "answer_delay_s": "apserve_answer_delay_seconds_sum",
    "answers_timed": "apserve_answer_delay_seconds_count",
    "engine_profiled_s": "apserve_engine_profiled_seconds_total",
    "worker_cpu_s": "apserve_worker_cpu_seconds_total",
    "batches": "apserve_batches_total",
}


def server_totals(url: str) -> dict[str, float]:
    """Totals so far from the server's /metrics: the engine thread's CPU seconds in Engine.run (CPU time
    rather than the batches' wall time: the event loop preempts the engine's thread on the shared core,
    and that time is the front end's), requests answered 200, and the sums and counts of the batch gap
    and the answer delay."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = dict.fromkeys([*SERVER_TOTALS, "answered"], 0.0)
    names = {v: k for k, v in SERVER_TOTALS.items()}
    for family in text_string_to_metric_families(get(f"{url}/metrics")[1].decode()):
        for sample in family.samples:
            if sample.name in names:
                totals[names[sample.name]] += sample.value
            elif sample.name == "apserve_requests_total" and sample.labels.get("outcome") == "ok":
                totals["answered"] += sample.value
    return totals


def unseen_latency_p90_ms(requests_csv: Path) -> float:
    """p90 of client latency - (queue_us + compute_us) over the answered requests of a run."""
    with requests_csv.open() as f:
        gaps = sorted(
            float(r["latency_ms"]) - (int(r["queue_us"]) + int(r["compute_us"])) / 1e3
            for r in csv.DictReader(f)
            if r["status"] == "200" and r["queue_us"] and r["compute_us"]
        )
    return gaps[int(0.9 * len(gaps))] if gaps else SLO_DEFAULT_MARGIN_MS


@dataclass(frozen=True)
class FrontEnd:
    """What the simulator takes from a saturated fixed-1 server (see 1. in the module doc)."""

    cost_s: float  # the server core's time per answered request outside the engine and the worker's own work
    margin_ms: float  # slo's and power's margin: the p90 of the latency the server cannot see, or as given
    batch_gap_s: float  # mean engine idle before a batch that followed another
    answer_delay_s: float  # mean time from a batch's end until an answer was sent
    machine_speed: float = 1.0  # the engine's CPU time over its profiled time in the calibration run
    batch_cost_s: float = 0.0  # the worker's CPU time outside Engine.run per batch


def measure_front_end(work: Path, env: dict[str, str], seconds: float, images: int) -> FrontEnd:
    """The front end at saturation (fixed-1, where the engine's share is smallest and the front end's
    matters most)."""
    server = Server("fixed-1", work / "request-cost-server.log", SERVER_CPU, env)
    try:
        server.wait_ready(120)
        closed_loop(work / "request-cost-warmup", "fixed-1", 3.0, 32, images, url=server.url, scrape_interval_s=0)
        before = server_totals(server.url)
        t0 = time.monotonic()
        closed_loop(work / "request-cost", "fixed-1", seconds, 32, images, url=server.url, scrape_interval_s=0)
        wall = time.monotonic() - t0
        after = server_totals(server.url)
    finally:
        server.stop()
    d = {k: after[k] - before[k] for k in after}
    return FrontEnd(
        cost_s=max(0.0, (wall - d["engine_cpu_s"] - d["worker_cpu_s"]) / max(1.0, d["answered"])),
        batch_cost_s=d["worker_cpu_s"] / d["batches"] if d["batches"] else 0.0,
        margin_ms=round(unseen_latency_p90_ms(work / "request-cost" / "requests.csv"), 1),
        batch_gap_s=d["gap_s"] / d["gaps"] if d["gaps"] else 0.0,
        answer_delay_s=d["answer_delay_s"] / d["answers_timed"] if d["answers_timed"] else 0.0,
        machine_speed=d["engine_cpu_s"] / d["engine_profiled_s"] if d["engine_profiled_s"] > 0 else 1.0,
    )


def machine_speed(report: dict[str, Any]) -> MachineSpeed | None:
    """The engine's speed per scrape interval of a run (loadtest report time series), from the time of the
    run's first request, which is the trace's start to within one inter-arrival gap."""
    ts = report.get("timeseries", {})
    times, speeds = ts.get("scrape_t", []), ts.get("scrape_engine_speed", [])
    rows = [(max(0.0, t), f) for t, f in zip(times, speeds[1:], strict=False) if f is not None]
    rows = [row for i, row in enumerate(rows) if i == 0 or row[0] > rows[i - 1][0]]
    return MachineSpeed(tuple(t for t, _ in rows), tuple(f for _, f in rows)) if rows else None


def simulate(
    trace: Path,
    policy: str,
    slo_ms: float,
    options: dict[str, Any],
    profile: Path | None,
    front: FrontEnd,
    speed: Path | None = None,
) -> dict[str, Any]:
    cmd = [str(Path(sys.executable).with_name("apserve")), "simulate", "--trace", str(trace), "--policy", policy]
    cmd += ["--slo-ms", f"{slo_ms:g}", "--request-cost-us", f"{front.cost_s * 1e6:.1f}", "--json"]
    cmd += ["--batch-cost-us", f"{front.batch_cost_s * 1e6:.1f}"]
    cmd += [
        "--batch-gap-us",
        f"{front.batch_gap_s * 1e6:.1f}",
        "--answer-delay-us",
        f"{front.answer_delay_s * 1e6:.1f}",
    ]
    if speed is not None:
        cmd += ["--machine-speed", str(speed)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    if options:
        cmd += ["--policy-options", json.dumps(options)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return dict(json.loads(done.stdout))


def metrics_overhead(work: Path, env: dict[str, str], seconds: float, images: int, pairs: int = 3) -> dict[str, Any]:
    """fixed-8 saturated without and with a 1 s /metrics scrape, alternated ``pairs`` times on one server;
    then the server's own CPU time per scrape, over 200 scrapes of the idle server after that load (its
    histograms filled): a direct measure that the VM's noise between throughput runs cannot blur."""
    server = Server("fixed-8", work / "overhead-server.log", SERVER_CPU, env)
    try:
        server.wait_ready(120)
        rates: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(pairs):
            for mode, interval in (("off", 0.0), ("on", 1.0)):
                out = work / f"overhead-{mode}-{i}"
                r = closed_loop(out, "fixed-8", seconds, 32, images, url=server.url, scrape_interval_s=interval)
                rates[mode].append(r["throughput_rps"])
        scrapes = 200
        before = cpu_seconds(server.proc.pid)
        for _ in range(scrapes):
            get(f"{server.url}/metrics")
        cpu_per_scrape_s = (cpu_seconds(server.proc.pid) - before) / scrapes
    finally:
        server.stop()
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    return {
        "rps_without_scrape": rates["off"],
        "rps_with_1s_scrape": rates["on"],
        "loss": 1 - on / off,
        "server_cpu_ms_per_scrape": cpu_per_scrape_s * 1e3,
    }


def cpu_steal_s() -> dict[str, float]:
    """Seconds each CPU has waited for the hypervisor so far (/proc/stat "steal"; empty where unreadable).
    A VM's stolen time stalls whatever runs, server or load generator: reported beside each run."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return {}
    hz = os.sysconf("SC_CLK_TCK")
    cpus = {f"cpu{SERVER_CPU}": "server_core", f"cpu{LOAD_CPU}": "load_core"}
    return {cpus[f[0]]: int(f[8]) / hz for f in (line.split() for line in lines) if f and f[0] in cpus and len(f) > 8}


def mean_bits(ts: dict[str, Any]) -> list[float | None]:
    shares = ts.get("bits_share", {})
    out: list[float | None] = []
    for i in range(len(ts["t"])):
        total = sum(shares[b][i] for b in shares)
        out.append(sum(int(b) * shares[b][i] for b in shares) / total if total else None)
    return out


def plots(results: dict[str, dict[str, Any]], slo_ms: float, spike: tuple[float, float], img: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    panels = [
        ("spike_p99.png", "p99 latency of answered requests (ms)", lambda ts: ts["p99_ms"], slo_ms),
        ("spike_attainment.png", "SLO attainment per second (%)", lambda ts: [_pct(v) for v in ts["attainment"]], None),
        ("spike_bits.png", "mean bits served", mean_bits, None),
        ("spike_accuracy.png", "served accuracy (%)", lambda ts: [_pct(v) for v in ts["served_accuracy"]], None),
        ("spike_throughput.png", "answered requests / s", lambda ts: ts["ok_rps"], None),
    ]
    paths = []
    for name, label, series, line in panels:
        fig, ax = plt.subplots(figsize=(8, 3.4))
        ax.axvspan(*spike, color="0.9", label="3x spike")
        for policy, report in results.items():
            ts = report["timeseries"]
            ax.plot(ts["t"], [float("nan") if v is None else v for v in series(ts)], label=policy)
        if line is not None:
            ax.axhline(line, color="red", linestyle="--", label=f"SLO {line:g} ms")
        if name == "spike_throughput.png":
            first = next(iter(results.values()))["timeseries"]
            ax.plot(first["t"], first["sent_rps"], color="black", linestyle=":", label="offered")
        ax.set(xlabel="time (s)", ylabel=label)
        if name == "spike_p99.png":
            ax.set_yscale("log")
        ax.legend(fontsize="small", loc="best")
        fig.tight_layout()
        fig.savefig(img / name, dpi=90)
        plt.close(fig)
        paths.append(img / name)
    return paths


def _pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def _fmt(v: Any, scale: float = 1.0, digits: int = 1) -> str:
    return "n/a" if v is None else f"{scale * v:.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of spike load per policy")
    ap.add_argument("--slo-ms", type=float, default=50.0)
    ap.add_argument(
        "--images",
        type=int,
        default=1,
        help="images per request (default 1): a client that batches its own images sends fewer, larger requests",
    )
    ap.add_argument("--policies", default="fixed-8,fixed-1,slo,power")
    ap.add_argument("--capacity", type=float, default=None, help="fixed-8 capacity, requests/s (default: measure)")
    ap.add_argument("--request-cost-us", type=float, default=None, help="front-end cost per request (default: measure)")
    ap.add_argument(
        "--margin-ms", type=float, default=None, help="margin_ms of slo and power (default: measured, see 1.)"
    )
    ap.add_argument("--batch-gap-us", type=float, default=None, help="for the simulator (default: measured)")
    ap.add_argument("--answer-delay-us", type=float, default=None, help="for the simulator (default: measured)")
    ap.add_argument(
        "--power-budget", type=float, default=None, help="watts (default: idle + 60 %% of fixed-8's draw above idle)"
    )
    ap.add_argument("--overhead-s", type=float, default=10.0, help="seconds per /metrics overhead run (0: skip)")
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="profile JSON for server and simulator (default: this machine's, as a server finds it)",
    )
    ap.add_argument("--make-profile", action="store_true", help="profile 1 thread on the server core first")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "experiment_spike")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--rounds", type=int, default=1, help="calibration and policies this many times, alternated; medians"
    )
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    profile = args.profile
    if profile is not None:
        chosen = args.work / "profile.json"
        chosen.write_text(profile.read_text())
        chosen_backend_rows(chosen)
        profile = chosen
    if args.make_profile:
        profile = args.work / "profile-1thread.json"
        print(f"profiling into {profile}", file=sys.stderr)
        make_profile(profile)
    if profile is None:  # the one a server plans with on this machine: the simulator must predict with it too
        model = artifact.load()
        profile = profiler.for_this_machine(model, profiler.default_path(model), threads=1)[1]
    env = server_env(args.slo_ms, profile)
    # capacity and overhead runs send no deadline, and the server gets no default one
    no_deadline = {k: v for k, v in env.items() if k != "APSERVE_SLO_MS"}

    capacity = args.capacity
    if capacity is None:
        cap = closed_loop(
            args.work / "capacity", "fixed-8", 10.0, 32, args.images, server_env=no_deadline, scrape_interval_s=0
        )
        capacity = cap["throughput_rps"]
    print(
        f"fixed-8 capacity: {capacity:.1f} requests/s of {args.images} image(s), {capacity * args.images:.0f} images/s",
        file=sys.stderr,
    )
    base, peak = 0.5 * capacity, 3 * capacity
    shape = build_shape("spike", duration_s=args.duration, base_rps=base, peak_rps=peak)
    trace = args.work / "spike.csv"
    write_trace(trace, arrivals(shape, seed=args.seed), slo_ms=args.slo_ms, images=args.images)

    rounds: list[Round] = []
    budget = args.power_budget
    for r in range(args.rounds):
        work = args.work if args.rounds == 1 else args.work / f"round-{r + 1}"
        work.mkdir(parents=True, exist_ok=True)
        one = run_round(args, work, (env, no_deadline), trace, (base, peak), profile, budget)
        budget = one.budget_w
        rounds.append(one)
        if args.rounds > 1:
            print(f"round {r + 1} of {args.rounds}:", file=sys.stderr)
            print_table(one, file=sys.stderr)
    first = rounds[0]  # the top-level figures and the plots: the first round

    overhead = metrics_overhead(args.work, no_deadline, args.overhead_s, args.images) if args.overhead_s > 0 else None

    spike_window = shape.spike_window
    figures = plots(first.http, args.slo_ms, spike_window, args.docs / "img")
    summary = {
        "command": "python bench/experiment_spike.py " + " ".join(sys.argv[1:]),
        "capacity_rps": capacity,
        "images_per_request": args.images,
        "base_rps": base,
        "peak_rps": peak,
        "duration_s": args.duration,
        "slo_ms": args.slo_ms,
        "profile": str(profile) if profile else "the server's default",
        "pinning": {"server": f"taskset -c {SERVER_CPU}, 1 engine thread", "locust": f"taskset -c {LOAD_CPU}"},
        **first.as_dict(),
        "rounds": [one.as_dict() for one in rounds],
        "metrics_overhead": overhead,
        "plots": [str(p.relative_to(args.docs)) for p in figures],
        "wall_s": time.time() - started,
    }
    (args.docs / "experiment_spike.json").write_text(json.dumps(summary, indent=1))

    print(
        f"fixed-8 capacity {capacity:.0f} req/s of {args.images} image(s); spike {base:.0f} -> {peak:.0f} -> {base:.0f} req/s; SLO {args.slo_ms:g} ms"
    )
    for i, one in enumerate(rounds, start=1):
        print()
        if len(rounds) > 1:
            print(f"Round {i}:")
        print_table(one)
    if len(rounds) > 1:
        print()
        print_medians(rounds)
    if overhead:
        print()
        print(
            f"/metrics overhead: {statistics.median(overhead['rps_without_scrape']):.1f} req/s without scrape, "
            f"{statistics.median(overhead['rps_with_1s_scrape']):.1f} with a 1 s scrape: "
            f"{100 * overhead['loss']:.1f} % loss (medians of {len(overhead['rps_without_scrape'])} alternated pairs); "
            f"one scrape costs the server {overhead['server_cpu_ms_per_scrape']:.2f} ms of CPU, "
            f"{overhead['server_cpu_ms_per_scrape'] / 10:.2f} % of its core at one scrape a second"
        )
    return 0


@dataclass
class Round:
    """One calibration and one HTTP run of each policy, with its two simulations."""

    fronts: dict[str, FrontEnd]  # per policy: the calibration before its run
    budget_w: float | None
    http: dict[str, dict[str, Any]]
    simulated: dict[str, dict[str, Any]]  # the prediction: the profile at the calibration's machine speed
    as_profiled: dict[str, dict[str, Any]]  # the profile as it is (the prediction until session 11)
    replayed: dict[str, dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "calibration": {
                policy: {
                    "request_cost_us": front.cost_s * 1e6,
                    "batch_cost_us": front.batch_cost_s * 1e6,
                    "batch_gap_us": front.batch_gap_s * 1e6,
                    "answer_delay_us": front.answer_delay_s * 1e6,
                    "machine_speed": front.machine_speed,
                    "margin_ms": front.margin_ms,
                }
                for policy, front in self.fronts.items()
            },
            "power_budget_w": self.budget_w,
            "http": {p: {k: v for k, v in r.items() if k != "timeseries"} for p, r in self.http.items()},
            "simulated": self.simulated,
            "simulated_as_profiled": self.as_profiled,
            "simulated_with_machine_speed": self.replayed,
        }


def calibrate(args: argparse.Namespace, work: Path, env: dict[str, str]) -> FrontEnd:
    """The front end for the simulator and the margin for slo and power: measured (1.), or as given."""
    work.mkdir(parents=True, exist_ok=True)
    if args.request_cost_us is None:
        front = measure_front_end(work, env, 10.0, args.images)
    else:
        front = FrontEnd(args.request_cost_us / 1e6, SLO_DEFAULT_MARGIN_MS, 0.0, 0.0)
    front = replace(
        front,
        batch_gap_s=front.batch_gap_s if args.batch_gap_us is None else args.batch_gap_us / 1e6,
        answer_delay_s=front.answer_delay_s if args.answer_delay_us is None else args.answer_delay_us / 1e6,
        margin_ms=front.margin_ms if args.margin_ms is None else args.margin_ms,
    )
    print(
        f"front end: {front.cost_s * 1e6:.0f} us per request and {front.batch_cost_s * 1e6:.0f} us per batch, "
        f"batch gap {front.batch_gap_s * 1e6:.0f} us, "
        f"answer delay {front.answer_delay_s * 1e6:.0f} us, machine speed {front.machine_speed:.2f} x the "
        f"profile; margin_ms of slo and power {front.margin_ms:g}",
        file=sys.stderr,
    )
    return front


def run_round(
    args: argparse.Namespace,
    work: Path,
    envs: tuple[dict[str, str], dict[str, str]],
    trace: Path,
    rates: tuple[float, float],
    profile: Path | None,
    budget: float | None,
) -> Round:
    """Each policy: a calibration (1.), then a fresh server through the spike (3.), then simulated three
    times. ``envs``: the servers' environment for the spike and for the calibration (no deadline);
    ``rates``: the spike's base and peak requests/s (the trace is drawn from the same shape)."""
    env, no_deadline = envs
    base, peak = rates
    fronts: dict[str, FrontEnd] = {}
    results: dict[str, dict[str, Any]] = {}
    sims: dict[str, dict[str, Any]] = {}
    as_profiled: dict[str, dict[str, Any]] = {}
    replayed: dict[str, dict[str, Any]] = {}
    for policy in args.policies.split(","):
        # Calibrated right before the policy's own run: the prediction takes the machine's speed as it was
        # then, since this VM's speed moves by half within minutes (one calibration per round left a
        # minute or more between it and the last policies' runs).
        front = fronts[policy] = calibrate(args, work / f"calibration-{policy}", no_deadline)
        calibrated = work / f"calibrated-speed-{policy}.csv"
        write_csv(calibrated, MachineSpeed((0.0,), (front.machine_speed,)))
        options: dict[str, Any] = {}
        if policy == "power":
            if budget is None:
                # idle + 60 % of what fixed-8 drew above idle at its peak: a budget that binds in the spike
                drawn = results.get("fixed-8", {}).get("max_power_w")
                budget = round(IDLE_W + 0.6 * (drawn - IDLE_W), 2) if drawn and drawn > IDLE_W else IDLE_W + 5.0
            options = {"budget_w": budget, "margin_ms": front.margin_ms}
        elif policy == "slo":
            options = {"margin_ms": front.margin_ms}
        opts = LoadtestOptions(
            shape="spike",
            policy=policy,
            duration_s=args.duration,
            out=work / policy,
            base_rps=base,
            peak_rps=peak,
            # enough users that the peak's rate survives its latency (Little's law): a Locust user waits
            # for its reply, so 100 users at 1,850 requests/s and ~100 ms replies (fixed-8 in overload)
            # sent a third less than the trace, and later
            user_rps=peak / USERS,
            slo_mix=f"{args.slo_ms:g}",
            server_cpus=SERVER_CPU,
            load_cpus=LOAD_CPU,
            server_env={**env, **({"APSERVE_POLICY_OPTIONS": json.dumps(options)} if options else {})},
            seed=args.seed,
            batch=args.images,
        )
        print(f"{policy}: {args.duration:g} s spike", file=sys.stderr)
        steal_before = cpu_steal_s()
        results[policy] = run(opts, progress=False)
        results[policy]["vm_steal_s"] = {c: cpu_steal_s().get(c, 0.0) - v for c, v in steal_before.items()}
        sims[policy] = simulate(trace, policy, args.slo_ms, options, profile, front, calibrated)
        as_profiled[policy] = simulate(trace, policy, args.slo_ms, options, profile, front)
        speed = machine_speed(results[policy])
        if speed is not None:
            speed_csv = work / policy / "machine-speed.csv"
            write_csv(speed_csv, speed)
            # and the front end's cost as this run measured it (None: a server without process metrics)
            split = results[policy].get("front_end_split_us")
            as_run = front
            if split is not None:
                as_run = replace(front, cost_s=split["per_request"] / 1e6, batch_cost_s=split["per_batch"] / 1e6)
            replayed[policy] = simulate(trace, policy, args.slo_ms, options, profile, as_run, speed_csv)
            replayed[policy]["machine_speed"] = {"min": min(speed.factors), "max": max(speed.factors)}
            replayed[policy]["front_end_split_us"] = split
    return Round(fronts, budget, results, sims, as_profiled, replayed)


def print_table(one: Round, file: Any = None) -> None:
    print(f"power budget {_fmt(one.budget_w, digits=2)} W", file=file)
    print(file=file)
    print(
        "| policy | calibration: front end µs/request, µs/batch, gap µs, answer delay µs, machine speed, margin ms "
        "| SLO attainment | served accuracy | p50 ms | p99 ms | refused | energy J "
        "| simulated: attainment / accuracy | simulated as profiled "
        "| simulated with the run's machine speed and front-end cost "
        "| engine speed, min–max | front end in the run: µs/request (all), µs/request + µs/batch "
        "| VM steal, server / load core |",
        file=file,
    )
    print("| --- " * 14 + "|", file=file)
    for policy, r in one.http.items():
        again = one.replayed.get(policy, {})
        front = one.fronts[policy]
        calibration = (
            f"{front.cost_s * 1e6:.0f}, {front.batch_cost_s * 1e6:.0f}, {front.batch_gap_s * 1e6:.0f}, "
            f"{front.answer_delay_s * 1e6:.0f}, "
            f"{front.machine_speed:.2f}, {front.margin_ms:g}"
        )
        print(
            f"| {policy} | {calibration} | {_fmt(r['slo_attainment'], 100)} % | {_fmt(r['served_accuracy'], 100, 2)} % | "
            f"{_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | {r['rejected']} of {r['requests']} | "
            f"{_fmt(r['energy_j'])} | {_sim(one.simulated[policy])} | {_sim(one.as_profiled.get(policy, {}))} | "
            f"{_sim(again)} | "
            f"{_span(again.get('machine_speed'))} | {_fmt(r.get('front_end_us_per_request'))}, "
            f"{_split(r.get('front_end_split_us'))} | "
            f"{_steal(r.get('vm_steal_s', {}))} |",
            file=file,
        )


def _split(split: dict[str, float] | None) -> str:
    return "–" if split is None else f"{split['per_request']:.0f} + {split['per_batch']:.0f}"


def print_medians(rounds: list[Round]) -> None:
    """Per policy, the median over rounds of each attainment (and the rounds' values)."""
    print(f"Medians over {len(rounds)} rounds (each round's values in brackets), SLO attainment %:")
    print()
    print(
        "| policy | HTTP | simulated (the profile at the calibration's machine speed) | simulated as profiled "
        "| with the run's machine speed and front-end cost | HTTP − simulated |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for policy in rounds[0].http:
        columns = [
            [one.http[policy].get("slo_attainment") for one in rounds],
            [one.simulated[policy].get("slo_attainment") for one in rounds],
            [one.as_profiled.get(policy, {}).get("slo_attainment") for one in rounds],
            [one.replayed.get(policy, {}).get("slo_attainment") for one in rounds],
        ]
        http_pct, sim_pct, profiled_pct, again_pct = ([100 * v for v in vs if v is not None] for vs in columns)
        gap = f"{statistics.median(http_pct) - statistics.median(sim_pct):+.1f}" if http_pct and sim_pct else "n/a"
        cells = " | ".join(_median_cell(c) for c in (http_pct, sim_pct, profiled_pct, again_pct))
        print(f"| {policy} | {cells} | {gap} |")


def _median_cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})"


def _span(speed: dict[str, float] | None) -> str:
    return f"{speed['min']:.2f}–{speed['max']:.2f}" if speed else "n/a"


def _sim(sim: dict[str, Any]) -> str:
    if "slo_attainment" not in sim:
        return f"n/a ({sim.get('error', 'not run')})"
    return f"{_fmt(sim.get('slo_attainment'), 100)} % / {_fmt(sim.get('served_accuracy'), 100, 2)} %"


def _steal(steal: dict[str, float]) -> str:
    if not steal:
        return "n/a"
    return f"{1e3 * steal.get('server_core', 0.0):.0f} / {1e3 * steal.get('load_core', 0.0):.0f} ms"


if __name__ == "__main__":
    sys.exit(main())
