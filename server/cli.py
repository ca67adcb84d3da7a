"""The `apserve` command. JSON (--json) goes to stdout alone; progress and logs go to stderr.

Each subcommand's work lives in its own room; this module only parses arguments and imports lazily,
so `apserve serve` never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from model_store.artifact import BITS, BUNDLED, ArtifactError


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=1) + "\n")


def _bits_arg(text: str) -> list[int]:
    try:
        bits = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be a comma-separated list of {list(BITS)}") from None
    bad = [b for b in bits if b not in BITS]
    if bad:
        raise argparse.ArgumentTypeError(f"bits {bad} not servable; choose from {list(BITS)}")
    return bits


def cmd_train(args: argparse.Namespace) -> int:
    from training.cli import run_train

    return run_train(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from kernels.engine import Engine
    from kernels.evaluate import accuracy
    from kernels.reference import ReferenceEngine
    from model_store import artifact, fashion_mnist

    model = artifact.load(args.model)
    test = fashion_mnist.load("test")
    if args.limit:
        test = fashion_mnist.Split(test.images[: args.limit], test.labels[: args.limit])
    runner = ReferenceEngine(model) if args.reference else Engine(model, threads=args.threads)
    acc = accuracy(runner.run, test, args.bits, progress=not args.quiet)
    result = {"model": model.name, "n": len(test), "accuracy": {str(b): acc[b] for b in args.bits}}
    if args.json:
        _print_json(result)
    else:
        print(f"{model.name} on {len(test)} Fashion-MNIST test images")
        for b in args.bits:
            print(f"  {b:>2} bits  {100 * acc[b]:6.2f} %")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from server.serve import run

    return run(args)


def cmd_simulate(args: argparse.Namespace) -> int:
    from policies import cascade, machine_speed, profile, simulator, traces
    from policies.energy import PowerModel
    from policies.registry import PolicyError, build_policy

    try:
        options = json.loads(args.policy_options) if args.policy_options else {}
    except json.JSONDecodeError as exc:
        print(f"apserve simulate: --policy-options is not valid JSON ({exc})", file=sys.stderr)
        return 2
    if not isinstance(options, dict):
        print("apserve simulate: --policy-options must be a JSON object", file=sys.stderr)
        return 2
    try:
        if args.profile == "synthetic":
            prof = profile.standin_profile()
        else:
            path = args.profile or BUNDLED.with_suffix(".profile.json")
            accuracy = {}
            if args.model.is_file():
                from model_store import artifact

                accuracy = artifact.load(args.model).accuracy("test")
            prof = profile.load_profile(path, accuracy)
        if not prof.accuracy:
            raise profile.ProfileError(f"{prof.source}: no accuracy per bits in the profile or the model manifest")
        outcome = None
        if args.cascade_calibration is not None:
            doc = json.loads(args.cascade_calibration.read_text())
            calibration = cascade.Calibration(**doc)
            outcome = simulator.CascadeOutcome(
                calibration.escalated_fraction, calibration.accuracy_kept, calibration.accuracy_escalated
            )
            if args.policy == "cascade":
                options = {
                    "threshold": calibration.threshold,
                    "low_bits": calibration.low_bits,
                    "high_bits": calibration.high_bits,
                    **options,
                }
        elif args.policy == "cascade":
            raise PolicyError("simulating cascade needs --cascade-calibration FILE (scripts/calibrate_cascade.py)")
        build_policy(args.policy, options)  # settings errors now, not inside the run
        capacity = simulator.fixed8_capacity(prof, args.max_batch)
        if Path(args.trace).suffix == ".csv" or Path(args.trace).is_file():
            trace = traces.read_csv(args.trace)
        else:
            trace = traces.generate(args.trace, capacity, seed=args.seed, duration=args.duration, load=args.load)
        budget = options.get("budget_w") if isinstance(options.get("budget_w"), int | float) else None
        config = simulator.SimConfig(
            slo_ms=args.slo_ms,
            max_batch_size=args.max_batch,
            replicas=args.replicas,
            seed=args.seed,
            power_model=PowerModel(args.watts_per_core, args.idle_w),
            window_s=args.window_s,
            budget_w=budget,
            cascade=outcome,
            request_cost_s=args.request_cost_us / 1e6,
            batch_cost_s=args.batch_cost_us / 1e6,
            machine_speed=machine_speed.read_csv(args.machine_speed) if args.machine_speed else None,
            batch_gap_s=args.batch_gap_us / 1e6,
            answer_delay_s=args.answer_delay_us / 1e6,
        )
        result = simulator.simulate(lambda: build_policy(args.policy, options), trace, prof, config)
    except (profile.ProfileError, traces.TraceError, PolicyError, OSError, TypeError, ValueError) as exc:
        print(f"apserve simulate: {exc}", file=sys.stderr)
        return 2
    out = result.as_dict()
    out.update(
        trace_description=trace.description,
        slo_ms=args.slo_ms,
        replicas=args.replicas,
        profile=prof.source,
        capacity_fixed8_ips=capacity,
        accuracy_8=prof.accuracy.get(8),
        policy_options=options,
    )
    if args.json:
        _print_json(out)
    else:
        print(f"{out['policy']} on {trace.description}, SLO {args.slo_ms:g} ms, {args.replicas} replica(s)")
        for key in ("requests", "slo_attainment", "served_accuracy", "p50_ms", "p99_ms", "rejected", "expired"):
            print(f"  {key:<20} {out[key]}")
        print(f"  {'energy_j':<20} {out['energy_j']:.1f} (busy {out['busy_energy_j']:.1f})")
        print(f"  {'max_window_power_w':<20} {out['max_window_power_w']:.2f}")
        print(f"  {'bits_served':<20} {out['bits_served']}")
    return 0


def _positive_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"apserve: {what} must be a comma-separated list of positive integers, not {text!r}")
    return values


def cmd_profile(args: argparse.Namespace) -> int:
    from kernels import profiler
    from model_store import artifact

    if args.threads < 1:
        raise SystemExit("apserve: --threads must be at least 1")
    model = artifact.load(args.model)
    result = profiler.profile(
        model,
        threads=args.threads,
        batches=_positive_ints(args.batches, "--batches"),
        bits_list=args.bits,
        check_images=args.check_images,
        defaults_only=args.defaults_only,
    )
    out = profiler.save(result, args.out or profiler.default_path(model))
    print(f"apserve profile: wrote {out}", file=sys.stderr)
    if args.json:
        _print_json(result)
    else:
        for bits, backend in result["backends"].items():
            print(f"  {bits:>2} bits  {backend}")
        print(f"  pareto: {result['pareto']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kernels import bench, profiler
    from model_store import artifact

    if args.threads < 1:
        raise SystemExit("apserve: --threads must be at least 1")
    model = artifact.load(args.model)
    try:
        # by default the server's backends: the saved profile's choice
        backends = json.loads(args.profile.read_text())["backends"] if args.profile else profiler.saved_backends(model)
        result = bench.bench(model, threads=args.threads, backends=backends)
    except (OSError, KeyError, ValueError) as exc:
        raise SystemExit(f"apserve bench: {exc!r}") from None
    if args.json:
        _print_json(result)
    else:
        for row in result["rows"]:
            print(
                f"  {row['bits']:>2} bits batch {row['batch']:>3} {row['backend']:<18} {row['ms_median']:9.3f} ms {row['gmacs']:8.2f} GMAC/s"
            )
        for peer in result["peers"]:
            print(f"  {peer['name']:<26} batch {peer['batch']:>3} {peer['ms_median']:9.3f} ms")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apserve", description="Adaptive inference server for any-precision networks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the any-precision model (or a dedicated baseline) and write the artifact")
    p.add_argument("--recipe", default="default", help="recipe name under training/recipes or a YAML path")
    p.add_argument("--out", type=Path, default=None, help="run directory for checkpoints (default runs/RECIPE)")
    p.add_argument("--artifact", type=Path, default=None, help="artifact to write (default: runs/RECIPE/model.apm)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON on stdout")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy per bit-width on the 10,000-image Fashion-MNIST test set")
    p.add_argument("--model", type=Path, default=BUNDLED, help="artifact path (default: the bundled model)")
    p.add_argument("--bits", type=_bits_arg, default=list(BITS), help="comma-separated bits (default: all)")
    p.add_argument("--limit", type=int, default=0, help="only the first N test images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reference", action="store_true", help="use the numpy reference engine")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="serve the model over HTTP (KServe v2)")
    p.add_argument("--model", type=Path, default=None, help="artifact path (default: the bundled model)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--config", type=Path, default=None, help="YAML settings file (APSERVE_* variables override it)")
    p.add_argument("--policy", default=None, help="precision policy: fixed-K, hint, queue, slo, power, cascade, ...")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "profile", help="measure latency per (bits, batch) and backend, check each against the reference"
    )
    p.add_argument("--model", type=Path, default=BUNDLED, help="artifact path (default: the bundled model)")
    p.add_argument("--out", type=Path, default=None, help="profile file (default: beside the model, NAME.profile.json)")
    p.add_argument("--threads", type=int, default=2, help="cores the engine may use")
    p.add_argument("--bits", type=_bits_arg, default=list(BITS), help="comma-separated bits (default: all)")
    p.add_argument("--batches", default="1,2,4,8,16,32,64", help="comma-separated batch sizes")
    p.add_argument("--check-images", type=int, default=1000, help="test images each backend is checked on")
    p.add_argument("--defaults-only", action="store_true", help="time only the default backend per bits (quick)")
    p.add_argument("--json", action="store_true", help="print the profile on stdout")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("bench", help="benchmark the engine (bits 32, 8, 4, 2, 1 x batch 1, 32) against peers")
    p.add_argument("--model", type=Path, default=BUNDLED, help="artifact path (default: the bundled model)")
    p.add_argument("--threads", type=int, default=2, help="cores the engine and the peers may use")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="profile whose backends to use (default: the model's saved profile, as the server; else built-in)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("simulate", help="discrete-event simulation of a policy on a trace")
    p.add_argument("--trace", default="spike", help="poisson, step, spike, diurnal, or a CSV file (arrival_s, ...)")
    p.add_argument("--policy", default="slo", help="fixed-K, hint, queue, slo, power, cascade, composite")
    p.add_argument("--policy-options", default=None, help="policy settings as JSON, e.g. '{\"budget_w\": 15}'")
    p.add_argument("--replicas", type=int, default=1, help="servers behind join-shortest-queue")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ms", type=float, default=50.0, help="deadline of requests whose trace row has none")
    p.add_argument("--max-batch", type=int, default=32, help="max_batch_size of each server")
    p.add_argument("--duration", type=float, default=None, help="seconds of a generated trace (default per trace)")
    p.add_argument("--load", type=float, default=None, help="base load of a generated trace, x fixed-8 capacity")
    p.add_argument("--profile", default=None, help="profile JSON (default: beside the bundled model) or 'synthetic'")
    p.add_argument("--model", type=Path, default=BUNDLED, help="artifact whose manifest gives accuracy per bits")
    p.add_argument("--cascade-calibration", type=Path, default=None, help="JSON from scripts/calibrate_cascade.py")
    p.add_argument("--watts-per-core", type=float, default=10.0, help="power model: watts per busy core")
    p.add_argument("--idle-w", type=float, default=5.0, help="power model: idle watts")
    p.add_argument("--window-s", type=float, default=1.0, help="rolling power window, seconds")
    p.add_argument(
        "--request-cost-us",
        type=float,
        default=0.0,
        help="front-end CPU per request on the engine's core (HTTP in and out): slows batches as arrivals rise",
    )
    p.add_argument(
        "--batch-cost-us",
        type=float,
        default=0.0,
        help="the scheduler's CPU per batch on the engine's core (a server's apserve_worker_cpu_seconds_total "
        "per batch): slows batches as batches per second rise",
    )
    p.add_argument(
        "--machine-speed",
        type=Path,
        default=None,
        help="CSV t_s,factor: how much slower than profiled the machine ran from each time on (replayed)",
    )
    p.add_argument(
        "--batch-gap-us",
        type=float,
        default=0.0,
        help="engine idle before a batch that follows another (a server's apserve_batch_gap_seconds)",
    )
    p.add_argument(
        "--answer-delay-us",
        type=float,
        default=0.0,
        help="from a batch's end until its answers are sent (a server's apserve_answer_delay_seconds)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("loadtest", help="run Locust against a server and write a report (JSON + plots)")
    p.add_argument("--shape", default="spike", choices=["constant", "step", "spike", "diurnal", "replay"])
    p.add_argument("--policy", default="slo", help="policy of the server this command starts (ignored with --url)")
    p.add_argument("--url", default=None, help="load an already running server instead of starting one")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (replay: at most the trace)")
    p.add_argument("--out", type=Path, default=Path("runs/loadtest"), help="report directory")
    p.add_argument("--rps", type=float, default=20.0, help="base offered load, requests/s")
    p.add_argument("--peak-rps", type=float, default=None, help="peak offered load (default 3x --rps)")
    p.add_argument("--trace", type=Path, default=None, help="CSV of arrival times for --shape replay")
    p.add_argument("--user-rps", type=float, default=5.0, help="requests/s per Locust user (0: closed loop)")
    p.add_argument("--images", type=int, default=1, help="images per request (the rates count requests)")
    p.add_argument("--precision-mix", default="auto", help='weighted hints, e.g. "auto:8,1:1,8:1"')
    p.add_argument("--slo-mix", default="50", help='weighted slo_ms, 0 = none, e.g. "50:3,200:1"')
    p.add_argument("--priority-mix", default="0", help='weighted priorities, 0 = default, e.g. "1:1,2:4"')
    p.add_argument("--slo-gate", type=float, default=0.0, help="exit 1 when SLO attainment is below this fraction")
    p.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between /metrics scrapes (0: off)")
    p.add_argument("--server-cpus", default=None, help="taskset CPU list for the server, e.g. 0")
    p.add_argument("--load-cpus", default=None, help="taskset CPU list for Locust, e.g. 1")
    p.add_argument("--server-env", action="append", default=[], help="APSERVE_NAME=VALUE for the server started")
    p.add_argument("--json", action="store_true", help="print the report (without time series) on stdout")
    p.set_defaults(func=cmd_loadtest)
    return parser


def cmd_loadtest(args: argparse.Namespace) -> int:
    from loadtest.runner import LoadtestError, LoadtestOptions, parse_server_env, run

    try:
        opts = LoadtestOptions(
            shape=args.shape,
            policy=args.policy,
            url=args.url,
            duration_s=args.duration,
            out=args.out,
            base_rps=args.rps,
            peak_rps=args.peak_rps,
            trace=args.trace,
            user_rps=args.user_rps,
            batch=args.images,
            precision_mix=args.precision_mix,
            slo_mix=args.slo_mix,
            priority_mix=args.priority_mix,
            slo_gate=args.slo_gate,
            scrape_interval_s=args.scrape_interval,
            server_cpus=args.server_cpus,
            load_cpus=args.load_cpus,
            server_env=parse_server_env(args.server_env),
        )
        report = run(opts)
    except LoadtestError as exc:
        print(f"apserve loadtest: {exc}", file=sys.stderr)
        return 2
    if args.json:
        _print_json({k: v for k, v in report.items() if k != "timeseries"})
    return 1 if args.slo_gate and (report["slo_attainment"] or 0.0) < args.slo_gate else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ArtifactError as exc:
        print(f"apserve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
