"""The discrete-event simulator and the traces: determinism, the spike behaviour of the policies on the
stand-in profile (slowed 10x, SLO 10x, so a test simulates thousands of requests, not hundreds of
thousands), the power cap, CSV traces and the `apserve simulate` command."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from policies.base import AnswerDelay, BatchGap, Decision, Snapshot
from policies.fixed import FixedPolicy
from policies.machine_speed import MachineSpeed
from policies.machine_speed import read_csv as read_speed_csv
from policies.profile import parse_profile, standin_document
from policies.registry import build_policy
from policies.simulator import CascadeOutcome, SimConfig, fixed8_capacity, max_window_power, simulate
from policies.traces import Arrival, Trace, TraceError, generate, read_csv

SLOW = 10.0


def slow_profile():  # type: ignore[no-untyped-def]
    doc = standin_document()
    for row in doc["rows"]:
        row["ms_median"] *= SLOW
        row["cpu_ms"] *= SLOW
    return parse_profile(doc, "stand-in x10")


PROFILE = slow_profile()
CONFIG = SimConfig(slo_ms=50 * SLOW, window_s=1.0 * SLOW)
CAPACITY = fixed8_capacity(PROFILE, CONFIG.max_batch_size)


def run(policy: str, trace, config: SimConfig = CONFIG, **options: object):  # type: ignore[no-untyped-def]
    return simulate(lambda: build_policy(policy, options), trace, PROFILE, config)


@pytest.fixture(scope="module")
def spike():  # type: ignore[no-untyped-def]
    return generate("spike", CAPACITY, seed=1)  # 300 s, 3x for 30 s from 60 s


def test_same_seed_same_result_other_seed_other_trace(spike) -> None:  # type: ignore[no-untyped-def]
    short = generate("poisson", CAPACITY, seed=3, duration=60.0, load=1.5)
    a, b = run("slo", short).as_dict(), run("slo", short).as_dict()
    assert a == b
    assert generate("poisson", CAPACITY, seed=4, duration=60.0).arrivals != short.arrivals


def test_spike_slo_keeps_deadlines_fixed8_does_not(spike) -> None:  # type: ignore[no-untyped-def]
    fixed = run("fixed-8", spike)
    slo = run("slo", spike)
    assert fixed.slo_attainment < 0.70
    assert slo.slo_attainment >= 0.99
    assert slo.p99_ms <= CONFIG.slo_ms
    acc8 = PROFILE.accuracy[8]
    assert slo.served_accuracy >= acc8 - 0.015, slo.as_dict()
    assert set(slo.bits_served) > {"1"}  # it moved down for the spike and back up after


def test_front_end_cost_slows_batches_and_the_policy_adapts() -> None:
    """The HTTP front end on the engine's core (18 % of it at this load): fixed 8 bits, near capacity without
    it, falls behind; slo sees the slowdown through the latency scale, keeps its deadlines, and pays in
    accuracy instead."""
    trace = generate("poisson", CAPACITY, seed=2, duration=30.0 * SLOW, load=0.9)
    config = dataclasses.replace(CONFIG, request_cost_s=0.2 / CAPACITY)
    free, costly = run("fixed-8", trace), run("fixed-8", trace, config)
    assert costly.slo_attainment < free.slo_attainment - 0.1
    slo_free, slo_costly = run("slo", trace), run("slo", trace, config)
    # (in this 10x slowed world the scale's 2 s half-life is short against the batches: a little below 99 %)
    assert slo_free.slo_attainment >= 0.99 and slo_costly.slo_attainment >= 0.97, slo_costly.as_dict()
    assert slo_costly.served_accuracy < slo_free.served_accuracy


def test_requests_of_several_images_count_their_images_and_pay_the_front_end_once() -> None:
    """The same images per second sent as requests of 8 images: the engine's work is the images' (fixed 8
    bits still falls behind past its capacity), the front end's is the requests' (at a cost per request
    that puts single-image requests behind, the 8-image requests keep their deadlines)."""

    def grouped(trace: Trace) -> Trace:
        return Trace(trace.name, tuple(Arrival(a.time, images=8) for a in trace.arrivals[::8]), "8 per request")

    over = generate("poisson", CAPACITY, seed=6, duration=30.0 * SLOW, load=1.3)
    assert run("fixed-8", grouped(over)).slo_attainment < 0.9
    trace = generate("poisson", CAPACITY, seed=2, duration=30.0 * SLOW, load=0.9)
    costly = dataclasses.replace(CONFIG, request_cost_s=0.2 / CAPACITY)
    assert run("fixed-8", trace, costly).slo_attainment < 0.85
    eights = run("fixed-8", grouped(trace), costly)
    assert eights.slo_attainment >= 0.95 and eights.requests == len(trace.arrivals[::8])


def test_the_scheduler_cost_is_charged_per_batch_not_per_request() -> None:
    """The worker's own CPU per batch (``batch_cost_s``) shares the engine's core: the same cost slows a
    server that runs one-request batches (max_batch_size 1) past its deadlines, and leaves one that batches
    32 at a time nearly as it was."""
    trace = generate("poisson", CAPACITY, seed=5, duration=30.0 * SLOW, load=0.7)
    costly = dataclasses.replace(CONFIG, batch_cost_s=0.0015 * SLOW)
    assert run("fixed-1", trace, costly).slo_attainment >= run("fixed-1", trace).slo_attainment - 0.01
    single = dataclasses.replace(CONFIG, max_batch_size=1)
    single_costly = dataclasses.replace(costly, max_batch_size=1)
    assert run("fixed-1", trace, single).slo_attainment >= 0.99
    assert run("fixed-1", trace, single_costly).slo_attainment < 0.9


def test_a_holding_wait_is_asked_again_only_when_it_ends_and_refuses_what_it_would_make_late() -> None:
    """Decision.hold, as the server's scheduler honours it: the arrivals behind the head during the hold ask
    the policy nothing (one decision at the first arrival, one when the hold ends); an arrival that could
    not finish by its deadline starting at the hold's end is refused at once, not left to expire."""
    release = 0.1
    calls: list[float] = []

    class Holding:
        name = "holding"

        def decide(self, snapshot: Snapshot) -> Decision:
            calls.append(snapshot.now)
            if snapshot.now < release:
                return Decision(bits=None, wait_until=release, reason="budget", hold=True)
            return Decision(bits=1, requests=tuple(r.id for r in snapshot.queue[:32]), reason="go")

    # the head is due at 95 ms, before the hold it asked for ends (this policy's own doing: it expires);
    # the last arrival queues behind it (due at 96 ms) and cannot start before 100 ms: refused at once
    arrivals = [Arrival(0.0, slo_ms=95.0)] + [Arrival(0.01 * i, slo_ms=500.0) for i in range(1, 6)]
    arrivals.append(Arrival(0.06, slo_ms=36.0))
    trace = Trace("held", tuple(arrivals), "a hold of 100 ms")
    result = simulate(Holding, trace, PROFILE, dataclasses.replace(CONFIG, slo_ms=500.0))
    assert calls == [0.0, release]
    assert result.rejected == 1 and result.expired == 1 and result.served == 5


def test_answer_delay_counts_toward_latency_and_batch_gap_toward_throughput() -> None:
    """The server's two delays the front end's share does not cover. An answer leaving 20 ms (x10) after
    its batch adds exactly that to every latency; an engine idle 80 ms (x10) before each batch that follows
    another makes fixed 8 bits near capacity fall behind; the policy sees both, as the server's does."""
    trace = generate("poisson", CAPACITY, seed=3, duration=30.0 * SLOW, load=0.8)
    base = run("fixed-8", trace)
    answered = run("fixed-8", trace, dataclasses.replace(CONFIG, answer_delay_s=0.002 * SLOW))
    assert answered.p50_ms == pytest.approx(base.p50_ms + 2.0 * SLOW)
    assert answered.energy_j == pytest.approx(base.energy_j)
    both = dataclasses.replace(CONFIG, batch_gap_s=0.008 * SLOW, answer_delay_s=0.002 * SLOW)
    assert base.slo_attainment >= 0.99 and run("fixed-8", trace, both).slo_attainment < 0.9

    seen: list[tuple[float, float]] = []

    class Watching:
        name = "fixed-8"

        def decide(self, snapshot: Snapshot) -> Decision:
            seen.append((snapshot.batch_gap_s, snapshot.answer_delay_s))
            return FixedPolicy(8).decide(snapshot)

    simulate(Watching, trace, PROFILE, both)
    # (bounded as the server bounds them: each observation at most BatchGap.high, AnswerDelay.high)
    assert seen[0] == (0.0, 0.0) and max(g for g, _ in seen) > 0.5 * BatchGap().high
    assert max(a for _, a in seen) > 0.5 * AnswerDelay().high


def test_a_replayed_machine_slowdown_overloads_fixed_bits_and_slo_moves_down() -> None:
    """The machine at 1.8 x its profiled time for a middle third of the trace (as this VM does for seconds
    at a time): fixed 8 bits at 0.7 x capacity falls behind in exactly that stretch; slo sees the slowdown
    through the latency scale and serves fewer bits there; a factor of 1 changes nothing at all."""
    trace = generate("poisson", CAPACITY, seed=5, duration=30.0 * SLOW, load=0.7)
    slow = MachineSpeed(starts=(10.0 * SLOW, 20.0 * SLOW), factors=(1.8, 1.0))
    steady = dataclasses.replace(CONFIG, machine_speed=MachineSpeed(starts=(0.0,), factors=(1.0,)))
    assert run("fixed-8", trace, steady).as_dict() == run("fixed-8", trace).as_dict()
    slowed = dataclasses.replace(CONFIG, machine_speed=slow)
    fixed, fixed_slowed = run("fixed-8", trace), run("fixed-8", trace, slowed)
    assert fixed.slo_attainment >= 0.99 and fixed_slowed.slo_attainment < 0.9, fixed_slowed.as_dict()
    slo, slo_slowed = run("slo", trace), run("slo", trace, slowed)
    assert slo_slowed.slo_attainment >= 0.97, slo_slowed.as_dict()
    assert slo_slowed.served_accuracy < slo.served_accuracy


def test_machine_speed_file(tmp_path: Path) -> None:
    path = tmp_path / "speed.csv"
    path.write_text("t_s,factor\n0.5,1.25\n1.5,0.9\n")
    speed = read_speed_csv(path)
    assert [speed.at(t) for t in (0.0, 0.5, 1.0, 1.5, 99.0)] == [1.0, 1.25, 1.25, 0.9, 0.9]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("time,factor\n1,1\n", "header must be 't_s,factor'"),
        ("t_s,factor\n", "no rows"),
        ("t_s,factor\n1,fast\n", "line 2: t_s and factor must be numbers"),
        ("t_s,factor\n1,0\n", "line 2: factor must be a positive number"),
        ("t_s,factor\n1,nan\n", "line 2: factor must be a positive number"),
        ("t_s,factor\n1,1\n1,2\n", "line 3: t_s must be finite and later"),
    ],
)
def test_machine_speed_file_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "speed.csv"
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        read_speed_csv(path)


def test_power_policy_holds_the_budget_at_all_times() -> None:
    spike = generate("step", CAPACITY, seed=1, duration=120.0)  # 0.5x, then 1.5x for the second half
    budget = 15.0  # idle 5 W + one of the two cores' worth: fixed-8 draws up to 25 W under the load
    config = SimConfig(slo_ms=CONFIG.slo_ms, window_s=CONFIG.window_s, budget_w=budget)
    fixed = run("fixed-8", spike, config)
    power = run("power", spike, config, budget_w=budget)
    assert fixed.max_window_power_w > budget * 1.2
    assert power.max_window_power_w <= budget * 1.05
    composite = run("composite", spike, config, budget_w=budget)
    assert composite.max_window_power_w <= budget * 1.05


def test_cascade_saves_energy_at_the_accuracy_of_8_bits() -> None:
    trace = generate("poisson", CAPACITY, seed=2, duration=60.0, load=0.5)
    outcome = CascadeOutcome(escalated_fraction=0.2, accuracy_kept=0.955, accuracy_escalated=0.83)
    config = SimConfig(slo_ms=CONFIG.slo_ms, window_s=CONFIG.window_s, cascade=outcome)
    fixed = run("fixed-8", trace, config)
    cascade = run("cascade", trace, config, threshold=0.8)
    assert cascade.escalated == pytest.approx(0.2 * cascade.served, rel=0.1)
    assert cascade.served_accuracy == pytest.approx(0.8 * 0.955 + 0.2 * 0.83, abs=0.005)
    assert cascade.busy_energy_j < 0.7 * fixed.busy_energy_j


def test_replicas_share_the_load(spike) -> None:  # type: ignore[no-untyped-def]
    trace = generate("poisson", CAPACITY, seed=5, duration=60.0, load=1.6)
    one = run("fixed-8", trace)
    two = run("fixed-8", trace, SimConfig(slo_ms=CONFIG.slo_ms, window_s=CONFIG.window_s, replicas=2))
    assert one.slo_attainment < 0.9 and two.slo_attainment > 0.99


def test_max_window_power_is_exact_on_known_segments() -> None:
    # two 10 J batches of 1 s, 0.5 s apart: the worst 1 s window holds 10 J
    assert max_window_power([(0.0, 1.0, 10.0), (1.5, 2.5, 10.0)], 1.0, 5.0) == pytest.approx(15.0)
    # a 2 s window sees both batches at once
    assert max_window_power([(0.0, 1.0, 10.0), (1.5, 2.5, 10.0)], 2.0, 5.0) == pytest.approx(5.0 + 15.0 / 2)


def test_generated_traces_have_the_documented_rates() -> None:
    spike = generate("spike", 100.0, seed=0, duration=300.0)
    times = [a.time for a in spike.arrivals]
    inside = sum(60 <= t < 90 for t in times) / 30
    outside = sum(t < 60 for t in times) / 60
    assert inside == pytest.approx(300, rel=0.1) and outside == pytest.approx(50, rel=0.1)
    for name in ("poisson", "step", "diurnal"):
        assert len(generate(name, 100.0, seed=0).arrivals) > 1000
    with pytest.raises(TraceError, match="unknown trace 'burst'"):
        generate("burst", 100.0)


def test_csv_trace(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("arrival_s,slo_ms,precision,precision_policy\n0.0,,auto,\n0.5,200,4,strict\n0.5,,8,best_effort\n")
    trace = read_csv(path)
    assert [(a.time, a.slo_ms, a.precision, a.strict) for a in trace.arrivals] == [
        (0.0, None, None, False),
        (0.5, 200.0, 4, True),
        (0.5, None, 8, False),
    ]
    result = run("slo", trace)
    assert result.bits_served.get("4") == 1 and result.slo_attainment == 1.0
    sized = tmp_path / "sized.csv"
    sized.write_text("arrival_s,images\n0.0,4\n0.1,\n")
    assert [a.images for a in read_csv(sized).arrivals] == [4, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("time\n1\n", "'arrival_s' column"),
        ("", "'arrival_s' column"),
        ("arrival_s,colour\n1,red\n", r"unknown columns \['colour'\]"),
        ("arrival_s\nsoon\n", "line 2: arrival_s 'soon' is not a number"),
        ("arrival_s\n-1\n", "line 2: arrival_s must be a finite time >= 0"),
        ("arrival_s\n2\n1\n", "line 3: arrival_s 1 is earlier than the previous row"),
        ("arrival_s,slo_ms\n1,0\n", "line 2: slo_ms must be a positive number"),
        ("arrival_s,precision\n1,9\n", "line 2: precision '9' must be one of"),
        ("arrival_s,precision_policy\n1,always\n", "precision_policy must be"),
        ("arrival_s,precision_policy\n1,strict\n", "strict precision_policy needs a precision"),
        ("arrival_s\n", "no arrivals"),
        ("arrival_s,images\n1,0\n", "line 2: images must be a whole number >= 1, got '0'"),
        ("arrival_s,images\n1,2.5\n", "line 2: images must be a whole number >= 1"),
    ],
)
def test_csv_trace_errors_name_the_line_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        read_csv(path)
    with pytest.raises(TraceError, match="cannot read"):
        read_csv(tmp_path / "absent.csv")


def apserve(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("apserve")
    return subprocess.run([str(exe), "simulate", *args], capture_output=True, text=True, timeout=120, check=False)


def test_simulate_command_json_contract() -> None:
    done = apserve("--trace", "poisson", "--duration", "5", "--policy", "slo", "--profile", "synthetic", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for key in ("policy", "trace", "requests", "slo_attainment", "served_accuracy", "p50_ms", "p99_ms"):
        assert key in out
    for key in ("rejected", "energy_j", "max_window_power_w"):
        assert key in out
    assert out["policy"] == "slo" and out["trace"] == "poisson" and out["requests"] > 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "power"], "'budget_w' is required"),
        (["--policy", "cascade"], "needs --cascade-calibration"),
        (["--policy", "slo", "--policy-options", "{"], "not valid JSON"),
        (["--policy", "fastest"], "unknown policy 'fastest'"),
        (["--policy", "slo", "--trace", "nowhere.csv"], "cannot read the trace"),
        (["--policy", "slo", "--replicas", "0"], "replicas must be >= 1"),
        (["--policy", "slo", "--machine-speed", "nowhere.csv"], "cannot read the machine speed"),
    ],
)
def test_simulate_command_errors(args: list[str], message: str) -> None:
    done = apserve("--profile", "synthetic", "--duration", "1", *args)
    assert done.returncode == 2 and message in done.stderr and not done.stdout
