"""From the per-request log (and /metrics samples) to a report: summary figures, time series, PNG plots.

SLO attainment = requests answered 200 within their slo_ms / all requests sent (refused, timed out and
failed requests count as misses), the same definition as `apserve simulate`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OUTCOMES = ("ok", "rejected", "timeout", "invalid", "error")


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def _good(row: Mapping[str, str]) -> bool:
    slo = float(row["slo_ms"] or 0)
    return row["outcome"] == "ok" and (slo <= 0 or float(row["latency_ms"]) <= slo)


def summarize(
    rows: Sequence[Mapping[str, str]],
    accuracy: Mapping[int, float] | None = None,
    samples: Sequence[Mapping[str, float]] = (),
    bin_s: float = 1.0,
) -> dict[str, Any]:
    """Summary and per-bin time series. `accuracy`: accuracy per bits (fraction); `samples`: /metrics scrapes."""
    n = len(rows)
    ok = [r for r in rows if r["outcome"] == "ok"]
    lat_ok = [float(r["latency_ms"]) for r in ok]
    t0 = min((float(r["t"]) for r in rows), default=0.0)
    t_end = max((float(r["t"]) + float(r["latency_ms"]) / 1e3 for r in rows), default=t0)
    span = max(t_end - t0, 1e-9)
    bits_count: dict[str, int] = {}
    for r in ok:
        bits_count[r["bits"]] = bits_count.get(r["bits"], 0) + 1
    served = _served_accuracy(ok, accuracy)
    if served is None and samples:
        served = samples[-1].get("served_accuracy") or None  # the server's rolling gauge; 0: it knows no accuracy
    energy = None
    if len(samples) >= 2 and "energy_joules_total" in samples[0] and "energy_joules_total" in samples[-1]:
        energy = samples[-1]["energy_joules_total"] - samples[0]["energy_joules_total"]
    slos = sorted({float(r["slo_ms"] or 0) for r in rows})
    summary: dict[str, Any] = {
        "requests": n,
        "outcomes": {o: sum(1 for r in rows if r["outcome"] == o) for o in OUTCOMES},
        "rejected": sum(1 for r in rows if r["outcome"] in ("rejected", "timeout")),
        "slo_ms": slos,
        "slo_attainment": sum(1 for r in rows if _good(r)) / n if n else None,
        "served_accuracy": served,
        "p50_ms": _percentile(lat_ok, 50),
        "p90_ms": _percentile(lat_ok, 90),
        "p99_ms": _percentile(lat_ok, 99),
        "throughput_rps": len(ok) / span,
        "offered_rps": n / span,
        "bits": dict(sorted(bits_count.items(), key=lambda kv: int(kv[0] or 0))),
        "energy_j": energy,
        "energy_per_request_j": energy / len(ok) if energy is not None and ok else None,
        "max_power_w": max((s["power_watts"] for s in samples if "power_watts" in s), default=None),
        "power_budget_w": samples[-1].get("power_budget_watts") if samples else None,
        "front_end_us_per_request": _us(front_end_s_per_request(samples[0], samples[-1])) if samples else None,
        "front_end_split_us": _split_us(front_end_split(samples[0], samples[-1])) if samples else None,
    }
    summary["timeseries"] = _timeseries(rows, t0, bin_s, accuracy, samples)
    return summary


def _served_accuracy(ok: Sequence[Mapping[str, str]], accuracy: Mapping[int, float] | None) -> float | None:
    if not accuracy or not ok:
        return None
    known = [accuracy[int(r["bits"])] for r in ok if r["bits"] and int(r["bits"]) in accuracy]
    return float(np.mean(known)) if len(known) == len(ok) else None


def _timeseries(
    rows: Sequence[Mapping[str, str]],
    t0: float,
    bin_s: float,
    accuracy: Mapping[int, float] | None,
    samples: Sequence[Mapping[str, float]],
) -> dict[str, Any]:
    if not rows:
        return {"t": []}
    nbins = int(max(float(r["t"]) - t0 for r in rows) / bin_s) + 1
    bins: list[list[Mapping[str, str]]] = [[] for _ in range(nbins)]
    for r in rows:
        bins[int((float(r["t"]) - t0) / bin_s)].append(r)
    all_bits = sorted({r["bits"] for r in rows if r["outcome"] == "ok" and r["bits"]}, key=int)
    series: dict[str, Any] = {
        "t": [i * bin_s for i in range(nbins)],
        "sent_rps": [],
        "ok_rps": [],
        "refused_rps": [],
        "p50_ms": [],
        "p99_ms": [],
        "attainment": [],
        "served_accuracy": [],
        "bits_share": {b: [] for b in all_bits},
    }
    for b in bins:
        ok = [r for r in b if r["outcome"] == "ok"]
        lat = [float(r["latency_ms"]) for r in ok]
        series["sent_rps"].append(len(b) / bin_s)
        series["ok_rps"].append(len(ok) / bin_s)
        series["refused_rps"].append(sum(1 for r in b if r["outcome"] in ("rejected", "timeout")) / bin_s)
        series["p50_ms"].append(_percentile(lat, 50))
        series["p99_ms"].append(_percentile(lat, 99))
        series["attainment"].append(sum(1 for r in b if _good(r)) / len(b) if b else None)
        series["served_accuracy"].append(_served_accuracy(ok, accuracy))
        for bits in all_bits:
            series["bits_share"][bits].append(sum(1 for r in ok if r["bits"] == bits) / len(ok) if ok else 0.0)
    if samples:
        series["scrape_t"] = [s["t"] - t0 for s in samples]
        for key in ("served_accuracy", "power_watts", "queue_depth"):
            series[f"scrape_{key}"] = [s.get(key) for s in samples]
        pairs = list(zip(samples, samples[1:], strict=False))
        # the engine's CPU time over its profiled time: 1 runs as profiled, 1.5 takes half as long again (the
        # machine, not the load: it is the engine thread's own CPU time)
        cpu, profiled = "engine_cpu_seconds_total", "engine_profiled_seconds_total"
        series["scrape_engine_speed"] = [None, *(_ratio_of_changes(a, b, cpu, profiled) for a, b in pairs)]
        gaps = [_ratio_of_changes(a, b, "batch_gap_seconds_sum", "batch_gap_seconds_count") for a, b in pairs]
        series["scrape_batch_gap_ms"] = [None, *(None if g is None else 1e3 * g for g in gaps)]
        costs = [front_end_s_per_request(a, b) for a, b in pairs]
        series["scrape_front_end_us"] = [None, *(_us(c) for c in costs)]
    return series


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else 1e6 * seconds


def front_end_s_per_request(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    """The server process's CPU seconds outside Engine.run per request it handled (any outcome) between
    two scrapes: what the simulator calls the request cost. None without the figures or the requests."""
    cpu = "process_cpu_seconds_total"
    if cpu not in before or cpu not in after:
        return None
    # counters with labels appear at their first increment: absent is 0
    requests = after.get("requests_total", 0.0) - before.get("requests_total", 0.0)
    if requests <= 0:
        return None
    engine = after.get("engine_cpu_seconds_total", 0.0) - before.get("engine_cpu_seconds_total", 0.0)
    return max(0.0, after[cpu] - before[cpu] - engine) / requests


def front_end_split(before: Mapping[str, float], after: Mapping[str, float]) -> tuple[float, float] | None:
    """The same CPU split in two, as the simulator charges it: (seconds per request handled, outside the
    engine and the workers' own work; the workers' CPU seconds outside Engine.run per batch). None without
    the figures, the requests or the batches."""
    names = ("process_cpu_seconds_total", "worker_cpu_seconds_total")
    if not all(n in before and n in after for n in names):
        return None
    requests = after.get("requests_total", 0.0) - before.get("requests_total", 0.0)
    batches = after.get("batches_total", 0.0) - before.get("batches_total", 0.0)
    if requests <= 0 or batches <= 0:
        return None
    engine = after.get("engine_cpu_seconds_total", 0.0) - before.get("engine_cpu_seconds_total", 0.0)
    worker = after[names[1]] - before[names[1]]
    return max(0.0, after[names[0]] - before[names[0]] - engine - worker) / requests, worker / batches


def _split_us(split: tuple[float, float] | None) -> dict[str, float] | None:
    return None if split is None else {"per_request": 1e6 * split[0], "per_batch": 1e6 * split[1]}


def _ratio_of_changes(
    before: Mapping[str, float], after: Mapping[str, float], numerator: str, denominator: str
) -> float | None:
    """How much ``numerator`` grew over how much ``denominator`` grew between two scrapes; None when the
    server did not report them or the denominator did not move (no batch)."""
    if not all(k in before and k in after for k in (numerator, denominator)):
        return None
    moved = after[denominator] - before[denominator]
    return (after[numerator] - before[numerator]) / moved if moved > 0 else None


def plot(report: Mapping[str, Any], out_dir: Path, title: str = "") -> list[Path]:
    """PNG plots: latency percentiles with the SLO line, bits over time, throughput, served accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = report["timeseries"]
    t = ts["t"]
    paths = []
    slos = [s for s in report.get("slo_ms", []) if s > 0]

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, _nan(ts["p50_ms"]), label="p50")
    ax.plot(t, _nan(ts["p99_ms"]), label="p99")
    for s in slos:
        ax.axhline(s, color="red", linestyle="--", label=f"SLO {s:g} ms")
    ax.set(xlabel="time (s)", ylabel="latency of answered requests (ms)", title=f"Latency {title}".strip())
    ax.set_ylim(bottom=0)
    ax.set_xlim(0, max(t[-1], 1.0) if t else 1.0)
    ax.legend(loc="upper right")
    save(fig, "latency.png")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    shares = ts.get("bits_share", {})
    if shares:
        ax.stackplot(t, *[shares[b] for b in shares], labels=[f"{b} bits" for b in shares])
        ax.legend(loc="upper right", fontsize="small")
    ax.set(xlabel="time (s)", ylabel="share of answered requests", title=f"Bits over time {title}".strip())
    ax.set_ylim(0, 1)
    save(fig, "bits.png")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, ts["sent_rps"], label="sent")
    ax.plot(t, ts["ok_rps"], label="answered 200")
    ax.plot(t, ts["refused_rps"], label="refused / timed out")
    ax.set(xlabel="time (s)", ylabel="requests / s", title=f"Throughput {title}".strip())
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right")
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, [100 * v if v is not None else math.nan for v in ts["served_accuracy"]], label="per second (from bits)")
    if ts.get("scrape_t"):
        acc = [100 * v if v is not None else math.nan for v in ts["scrape_served_accuracy"]]
        ax.plot(ts["scrape_t"], acc, label="server gauge (rolling)")
    ax.set(xlabel="time (s)", ylabel="served accuracy (%)", title=f"Served accuracy {title}".strip())
    ax.legend(loc="lower right")
    save(fig, "accuracy.png")
    return paths


def _nan(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]
