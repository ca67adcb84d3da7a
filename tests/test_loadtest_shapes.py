"""loadtest's pure parts: load shapes, traces, traffic mixes, the binary v2 encoding (checked by the server's parser)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from loadtest import report
from loadtest.protocol import (
    HEADER_LENGTH,
    MixError,
    decode_infer,
    encode_infer,
    number_mix,
    precision_mix,
    request_parameters,
)
from loadtest.shapes import ShapeError, arrivals, build_shape, read_trace, shape_from_env, trace_rates, write_trace
from server.protocol import parse_infer


def test_spike_is_base_then_peak_then_base() -> None:
    shape = build_shape("spike", duration_s=40, base_rps=10, peak_rps=30)
    assert [shape.rate(t) for t in (0, 9.9, 10, 29.9, 30, 39.9, 40)] == [10, 10, 30, 30, 10, 10, 0]
    assert shape.top_rate == 30
    assert shape.pool_size(per_user_rps=5) == 6  # sized for the peak, from the start
    assert shape.pool_size(per_user_rps=7) == 5
    assert build_shape("spike", base_rps=7).peak_rps == 21  # default peak: 3x


def test_step_and_diurnal_go_from_base_to_peak() -> None:
    step = build_shape("step", duration_s=40, base_rps=10, peak_rps=40, steps=4)
    assert [step.rate(t) for t in (0, 10, 20, 39)] == [10, 20, 30, 40]
    day = build_shape("diurnal", duration_s=100, base_rps=10, peak_rps=50)
    assert day.rate(0) == pytest.approx(10)
    assert day.rate(50) == pytest.approx(50)
    assert day.rate(25) == pytest.approx(30)
    assert build_shape("constant", duration_s=5, base_rps=3).rate(4.9) == 3


def test_arrivals_follow_the_shape_and_are_deterministic() -> None:
    shape = build_shape("spike", duration_s=40, base_rps=20, peak_rps=60)
    times = arrivals(shape, seed=3)
    assert times == arrivals(shape, seed=3) and times != arrivals(shape, seed=4)
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 40
    in_spike = sum(1 for t in times if 10 <= t < 30)
    outside = len(times) - in_spike
    assert in_spike == pytest.approx(1200, rel=0.1)  # 60/s for 20 s
    assert outside == pytest.approx(400, rel=0.15)  # 20/s for 20 s


def test_trace_round_trip_and_replay_shape(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    write_trace(path, [0.1, 0.2, 1.5, 2.25, 2.5, 2.75], slo_ms=50)
    assert read_trace(path) == [0.1, 0.2, 1.5, 2.25, 2.5, 2.75]
    assert trace_rates(read_trace(path)) == (2, 1, 3)
    replay = build_shape("replay", duration_s=0, trace=path)
    assert replay.duration_s == 3 and [replay.rate(t) for t in (0.5, 1.5, 2.5, 3.5)] == [2, 1, 3, 0]
    assert path.read_text().startswith("arrival_s,slo_ms")  # the simulator's CSV columns
    from policies.traces import read_csv

    assert [a.time for a in read_csv(path).arrivals] == read_trace(path)
    sized = tmp_path / "sized.csv"
    write_trace(sized, [0.1, 0.2], slo_ms=50, images=8)  # a client that sends 8 images per request
    assert sized.read_text().startswith("arrival_s,slo_ms,images")
    assert [(a.time, a.slo_ms, a.images) for a in read_csv(sized).arrivals] == [(0.1, 50.0, 8), (0.2, 50.0, 8)]
    assert read_trace(sized) == [0.1, 0.2]
    bare = tmp_path / "bare.csv"
    bare.write_text("0.5\n0.25\n")  # no header: the first column, sorted
    assert read_trace(bare) == [0.25, 0.5]


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "empty"), ("t\n", "no arrivals"), ("t\n0.1\nabc\n", "line 3"), ("t\n-1\n", "must be finite")],
)
def test_bad_traces_are_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ShapeError, match=message):
        read_trace(path)
    with pytest.raises(ShapeError, match="missing.csv"):
        read_trace(tmp_path / "missing.csv")


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ShapeError, match="unknown shape"):
        build_shape("sawtooth")
    with pytest.raises(ShapeError, match="peak rate"):
        build_shape("spike", base_rps=10, peak_rps=5)
    with pytest.raises(ShapeError, match="base rate"):
        build_shape("step", base_rps=0)
    with pytest.raises(ShapeError, match="needs a trace"):
        build_shape("replay")
    with pytest.raises(ShapeError, match="LOADTEST_"):
        shape_from_env({"LOADTEST_SHAPE": "spike", "LOADTEST_BASE_RPS": "fast"})
    assert shape_from_env({}) is None
    env_shape = shape_from_env({"LOADTEST_SHAPE": "step", "LOADTEST_DURATION_S": "8", "LOADTEST_BASE_RPS": "2"})
    assert env_shape is not None and env_shape.duration_s == 8 and env_shape.peak_rps == 6


def test_mixes_pick_by_weight_and_refuse_nonsense() -> None:
    mix = precision_mix("auto:8,1:1,8:1")
    rng = random.Random(0)
    picks = [mix.pick(rng) for _ in range(5000)]
    assert picks.count("auto") / 5000 == pytest.approx(0.8, abs=0.03)
    assert set(picks) == {"auto", "1", "8"}
    assert number_mix("50:3,200", "slo_ms").values == ("50", "200")
    for text, message in [("9", "not one of"), ("1:x", "not a number"), ("1:0", "sum to 0"), ("1,,2", "empty")]:
        with pytest.raises(MixError, match=message):
            precision_mix(text)
    with pytest.raises(MixError, match="slo_ms"):
        number_mix("-5", "slo_ms")


def test_binary_request_is_what_the_server_parses() -> None:
    pixels = np.arange(2 * 784, dtype=np.uint8)
    params = request_parameters("2", slo_ms=40, priority=1)
    body, headers = encode_infer(pixels.tobytes(), 2, params)
    assert int(headers[HEADER_LENGTH]) < len(body)
    parsed = parse_infer(body, headers[HEADER_LENGTH], max_batch_size=32, priority_levels=3)
    assert parsed.images.shape[0] == 2
    np.testing.assert_array_equal(parsed.images, pixels.reshape(2, 784))
    assert parsed.options.hint.preferred == 2 and not parsed.options.hint.strict
    assert parsed.options.priority == 1 and parsed.options.timeout_s == pytest.approx(0.040)
    assert parsed.binary_output
    assert request_parameters("auto", 0, 0) == {}
    with pytest.raises(ValueError, match="1568 bytes"):
        encode_infer(bytes(10), 2, {})


def test_reply_header_is_read_from_binary_and_json_replies() -> None:
    head = json.dumps({"parameters": {"bits": 4, "queue_us": 10}}).encode()
    assert decode_infer(head + bytes(40), {HEADER_LENGTH.lower(): str(len(head))})["parameters"]["bits"] == 4
    assert decode_infer(head, {})["parameters"]["queue_us"] == 10
    with pytest.raises(ValueError):
        decode_infer(b"[1, 2]", {})


def test_summary_counts_misses_and_served_accuracy() -> None:
    def row(t: float, ms: float, outcome: str, bits: str = "", slo: float = 50) -> dict[str, str]:
        return {"t": str(t), "latency_ms": str(ms), "outcome": outcome, "bits": bits, "slo_ms": str(slo)}

    rows = [
        row(0.1, 10, "ok", "8"),
        row(0.2, 60, "ok", "8"),  # late
        row(1.1, 5, "ok", "1"),
        row(1.2, 1, "rejected"),
        row(1.3, 50, "timeout"),
        row(1.4, 100, "ok", "1", slo=0),  # no SLO: any answer counts
    ]
    out = report.summarize(rows, accuracy={1: 0.8, 8: 0.9})
    assert out["requests"] == 6 and out["rejected"] == 2
    assert out["slo_attainment"] == pytest.approx(3 / 6)
    assert out["served_accuracy"] == pytest.approx((0.9 + 0.9 + 0.8 + 0.8) / 4)
    assert out["bits"] == {"1": 2, "8": 2}
    ts = out["timeseries"]
    assert ts["sent_rps"] == [2, 4] and ts["ok_rps"] == [2, 2] and ts["refused_rps"] == [0, 2]
    assert ts["bits_share"]["8"] == [1.0, 0.0]
    energy = report.summarize(
        rows, samples=[{"t": 0, "energy_joules_total": 5.0}, {"t": 2, "energy_joules_total": 9.0}]
    )
    assert energy["energy_j"] == 4.0 and energy["served_accuracy"] is None


def test_loadtest_never_imports_server() -> None:
    """It must load any apserve (or any v2 server) over HTTP alone."""
    import ast

    for path in (Path(__file__).resolve().parent.parent / "loadtest").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "server" or n.startswith("server.") for n in names), f"{path.name} imports {names}"
