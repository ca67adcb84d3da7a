"""Every decider through its edge cases, on the stand-in profile (policies.profile.standin_profile)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from policies.base import (
    AnswerDelay,
    ArrivalRate,
    BatchGap,
    Decision,
    LatencyScale,
    PowerState,
    QueuedRequest,
    Snapshot,
)
from policies.planning import Planner
from policies.profile import standin_profile
from policies.registry import PolicyError, build_policy, names

PROFILE = standin_profile()
ACC = PROFILE.accuracy
LAT = PROFILE.latency


def req(i: int, arrival: float = 0.0, slo_ms: float | None = 50.0, **kw: object) -> QueuedRequest:
    deadline = None if slo_ms is None else arrival + slo_ms / 1000
    return QueuedRequest(id=i, arrival=arrival, deadline=deadline, **kw)  # type: ignore[arg-type]


def snap(queue: list[QueuedRequest], now: float = 0.0, power: PowerState | None = None, batch: int = 32) -> Snapshot:
    order = sorted(queue, key=lambda r: (r.priority, r.deadline if r.deadline is not None else 1e18, r.arrival))
    return Snapshot(now=now, queue=tuple(order), profile=LAT, accuracy=ACC, max_batch_size=batch, power=power)


def checked(decision: Decision, s: Snapshot) -> Decision:
    """What the scheduler relies on: ids from the queue, no id both run and refused, every run request
    allows the bits, batch within max_batch_size."""
    ids = {r.id for r in s.queue}
    assert set(decision.requests) <= ids and set(decision.reject) <= ids
    assert not set(decision.requests) & set(decision.reject)
    if decision.bits is None:
        assert decision.requests == ()
    else:
        assert decision.requests, "bits chosen for no request"
        by_id = {r.id: r for r in s.queue}
        assert all(by_id[i].allows(decision.bits) for i in decision.requests)
        assert sum(by_id[i].size for i in decision.requests) <= max(s.max_batch_size, by_id[decision.requests[0]].size)
    return decision


ALL = ["fixed-8", "fixed-1", "hint", "queue", "slo", "cascade", "power", "composite"]
OPTIONS = {"cascade": {"threshold": 0.7}, "power": {"budget_w": 15.0}, "composite": {"budget_w": 15.0}}


def build(name: str, **extra: object):  # type: ignore[no-untyped-def]
    return build_policy(name, {**OPTIONS.get(name, {}), **extra})


@pytest.mark.parametrize("name", ALL)
def test_empty_queue_runs_nothing(name: str) -> None:
    decision = build(name).decide(snap([]))
    assert decision.bits is None and decision.requests == () and decision.reject == ()


@pytest.mark.parametrize("name", ALL)
def test_all_strict_requests_get_exactly_their_bits(name: str) -> None:
    queue = [req(i, preferred_bits=b, strict=True) for i, b in enumerate((3, 3, 32, 3))]
    s = snap(queue)
    decision = checked(build(name).decide(s), s)
    if name.startswith("fixed"):  # fixed-K serves only requests allowing K: none here
        assert decision.bits is None
    else:  # 3 bits is not on the Pareto front, yet a strict hint gets it
        assert decision.bits == 3 and set(decision.requests) == {0, 1, 3}


@pytest.mark.parametrize("name", ["slo", "composite"])
def test_impossible_deadlines_are_refused_not_served(name: str) -> None:
    # 0.1 ms left: not even 1 bit (0.6 ms) makes it; request 2 has plenty of time
    queue = [req(0, slo_ms=0.1), req(1, slo_ms=0.1, preferred_bits=8, strict=True), req(2, slo_ms=50)]
    s = snap(queue)
    decision = checked(build(name, margin_ms=0.0).decide(s), s)
    assert set(decision.reject) == {0, 1}
    assert decision.requests == (2,)


def test_slo_picks_the_most_accurate_bits_that_fit() -> None:
    s = snap([req(0, slo_ms=50)])
    assert checked(build("slo").decide(s), s).bits == 32  # fp32: the most accurate, 3.5 ms fits
    tight = snap([req(0, slo_ms=2.5 + 2.0)])  # 2.5 ms after the 2 ms margin: fp32 (3.5) no, 8 bits (1.9) yes
    assert checked(build("slo").decide(tight), tight).bits in (5, 6, 7, 8)  # accuracy ties: the fewest bits
    assert build("slo").decide(tight).bits == 5


def test_slo_moves_down_under_load_and_keeps_every_deadline_it_can() -> None:
    queue = [req(i, arrival=0.0, slo_ms=40) for i in range(100)]
    s = snap(queue, now=0.0)
    decision = checked(build("slo").decide(s), s)
    # 100 images in 38 ms (40 less the margin): only 1 bit in full batches (11.5 ms each) keeps up
    assert decision.bits == 1 and decision.requests == tuple(range(32)) and decision.reject == ()
    # 120 do not fit even so: in 38 ms, 3 full batches (34.6 ms) + 9 more fit; the other 15 are refused
    # now, including the 6 (105..110) that would fit only inside the margin: their answers would reach
    # the client late all the same
    s = snap([req(i, arrival=0.0, slo_ms=40) for i in range(120)], now=0.0)
    decision = checked(build("slo").decide(s), s)
    assert decision.bits == 1 and decision.reject == tuple(range(105, 120))
    # without a margin, exactly those 6 are kept
    decision = checked(build("slo", margin_ms=0.0).decide(s), s)
    assert decision.bits == 1 and decision.reject == tuple(range(111, 120))


def test_slo_in_overload_refuses_a_head_that_cannot_wait_for_an_efficient_batch() -> None:
    # 1 bit on the stand-in profile: 0.6 ms alone, 5 images (its efficient batch) in about 2 ms. The tight
    # request makes its 3 ms deadline (less the 2 ms margin) only in a batch of one.
    tight = req(999, arrival=0.0, slo_ms=3.0)
    crowd = [req(i, arrival=0.0, slo_ms=40) for i in range(120)]  # more than 38 ms of full 1-bit batches
    s = snap([tight, *crowd], now=0.0)
    decision = checked(build("slo").decide(s), s)
    assert 999 in decision.reject and decision.bits == 1 and decision.requests == tuple(range(32))
    # the same request with no overload behind it is served, alone if it must be
    s = snap([tight, *crowd[:10]], now=0.0)
    decision = checked(build("slo").decide(s), s)
    assert decision.reject == () and decision.requests[0] == 999


def test_the_efficient_batch_counts_the_engine_idle_time_before_each_batch() -> None:
    """1 bit on the stand-in profile: 5 images are within 15 % of the best time per image on the bare
    profile; when the engine lately stood idle 2 ms before every batch, that is a fixed cost per batch too,
    and it takes 16 images to share it."""
    s = snap([req(0)])
    assert Planner(s).efficient_batch(1) == 5
    assert Planner(dataclasses.replace(s, batch_gap_s=0.002)).efficient_batch(1) == 16


def test_slo_plans_with_the_observed_latency_scale() -> None:
    """Batches lately took 3x the profile (a busy core): fp32 (3.5 ms -> 10.5) no longer fits 8 ms of
    slack, 8 bits (1.9 -> 5.7) does."""
    s = snap([req(0, slo_ms=8 + 2.0)])
    assert checked(build("slo").decide(s), s).bits == 32
    slow = dataclasses.replace(s, latency_scale=3.0)
    assert checked(build("slo").decide(slow), slow).bits == 5


def test_slo_keeps_the_observed_answer_delay_free_before_deadlines() -> None:
    """Answers lately left 5 ms after their batch: of 8 ms of slack 3 remain, fp32 (3.5) no longer fits."""
    s = snap([req(0, slo_ms=8 + 2.0)])
    late = dataclasses.replace(s, answer_delay_s=0.005)
    assert checked(build("slo").decide(late), late).bits == 5


def test_slo_adds_the_observed_batch_gap_to_every_batch() -> None:
    """The engine lately stood idle before each batch: of 8 ms of slack, with 2 ms idle fp32 (3.5 + 2)
    still fits; with 5 ms, fp32 (3.5 + 5) no longer does and 5 bits (1.9 + 5) does."""
    s = snap([req(0, slo_ms=8 + 2.0)])
    gap = dataclasses.replace(s, batch_gap_s=0.002)
    assert checked(build("slo").decide(gap), gap).bits == 32
    wider = dataclasses.replace(s, batch_gap_s=0.005)  # 3.5 + 5 > 8: no longer
    assert checked(build("slo").decide(wider), wider).bits == 5


def test_batch_gap_is_bounded_and_relaxes() -> None:
    gap = BatchGap()
    for _ in range(50):
        gap.observe(1.0, now=0.0)  # long stalls: bounded
    assert 0.9 * gap.high < gap.value(0.0) <= gap.high
    assert gap.value(60.0) < 1e-6


def test_answer_delay_rises_faster_than_it_falls_and_is_bounded() -> None:
    delay = AnswerDelay(up=0.5, down=0.1)
    delay.observe(0.010, now=0.0)
    assert delay.value(0.0) == pytest.approx(0.005)
    delay.observe(0.0, now=0.0)
    assert delay.value(0.0) == pytest.approx(0.0045)
    delay.observe(10.0, now=0.0)  # one stall: bounded
    assert delay.value(0.0) <= delay.high


def test_latency_scale_follows_observed_over_profiled_within_bounds() -> None:
    scale = LatencyScale(up=0.5, down=0.5)
    scale.observe(observed_s=0.02, profiled_s=0.01, now=0.0)
    assert scale.value(0.0) == pytest.approx(1.5)
    for _ in range(50):
        scale.observe(observed_s=1.0, profiled_s=0.01, now=0.0)  # a stall: bounded, not 100x
    assert scale.value(0.0) == pytest.approx(scale.high)
    scale.observe(observed_s=0.01, profiled_s=0.0, now=0.0)  # bits without a profile row: ignored
    assert scale.value(0.0) == pytest.approx(scale.high)


def test_recent_levels_relax_when_nothing_is_observed() -> None:
    """A pessimistic level that makes the policy refuse everything sees no batch that would correct it:
    it must fade by itself."""
    scale, delay = LatencyScale(), AnswerDelay()
    for _ in range(30):
        scale.observe(4.0, 1.0, now=10.0)
        delay.observe(0.02, now=10.0)
    assert scale.value(10.0) > 3.5 and delay.value(10.0) > 0.015
    assert scale.value(10.0 + 2 * scale.half_life_s) == pytest.approx(1.0 + (scale.value(10.0) - 1.0) / 4)
    assert delay.value(10.0 + 20 * delay.half_life_s) < 1e-6


def test_slo_best_effort_hint_is_an_upper_wish() -> None:
    s = snap([req(0, preferred_bits=2)])
    assert checked(build("slo").decide(s), s).bits == 2  # fits: served as hinted, not upgraded to fp32


def test_slo_latest_start_timer_holds_a_short_queue_only_until_it_must_start() -> None:
    policy = build("slo", target_batch=8, hold_ms=5)
    s = snap([req(0, arrival=0.0, slo_ms=50)], now=0.001)
    decision = checked(policy.decide(s), s)
    assert decision.bits is None and decision.wait_until == pytest.approx(0.005)
    # 12 ms left: holding for a full batch at fp32 would miss, so the latest start is already behind us
    late = snap([req(0, arrival=0.0, slo_ms=14)], now=0.001)
    assert checked(policy.decide(late), late).bits is not None
    # a full batch never waits
    full = snap([req(i, arrival=0.0) for i in range(8)], now=0.001)
    assert checked(policy.decide(full), full).bits is not None


def test_mixed_priorities_serve_the_highest_first() -> None:
    queue = [req(0, priority=2, slo_ms=10), req(1, priority=1, slo_ms=40, max_bits=8)]
    s = snap(queue, batch=1)
    for name in ("hint", "slo", "queue", "fixed-8"):
        decision = checked(build(name).decide(s), s)
        assert decision.requests == (1,), name
    # the low-priority request still fits after the high one: slo does not refuse it
    assert build("slo").decide(s).reject == ()


def test_queue_policy_steps_down_and_back_with_hysteresis() -> None:
    policy = build("queue", levels=[[0, 8], [10, 2], [20, 1]], hysteresis=4)
    seen = []
    for depth in (1, 10, 20, 17, 15, 9, 5, 1):
        s = snap([req(i) for i in range(depth)])
        seen.append(checked(policy.decide(s), s).bits)
    assert seen == [5, 2, 1, 1, 2, 2, 5, 5]  # 5..8 bits tie on the stand-in (same cost and accuracy): fewest


def test_queue_policy_maps_non_pareto_levels_to_pareto_bits() -> None:
    s = snap([req(0)])
    assert build("queue", levels=[[0, 3]], hysteresis=0).decide(s).bits == 5  # 3 is dominated by 5 (same cost)


def test_slo_keeps_the_arrivals_expected_during_an_accurate_batch_in_reserve() -> None:
    s = snap([req(i) for i in range(48)])
    # nobody arriving: the queue absorbs a batch at 2 bits, then the rest at 1 bit
    calm = checked(build("slo", margin_ms=0.0).decide(s), s)
    assert (calm.bits, calm.reason) == (2, "slack")
    # 500 images/s arriving: what comes in while the 2-bit batch runs no longer fits behind it
    busy = dataclasses.replace(s, arrival_rate=500.0)
    assert checked(build("slo", margin_ms=0.0).decide(busy), busy).bits == 1


def test_arrival_rate_counts_images_of_the_last_window() -> None:
    rate = ArrivalRate(window_s=1.0)
    assert rate.value(0.0) == 0.0
    rate.observe(0.0, 4)
    rate.observe(0.5, 2)
    assert rate.value(0.9) == 6.0
    assert rate.value(1.2) == 2.0  # the 4 images of t = 0 left the window
    assert rate.value(2.0) == 0.0


def test_power_policy_most_accurate_within_budget() -> None:
    idle = PowerState(budget_w=15.0, window_s=1.0, energy_in_window_j=5.0, idle_w=5.0, watts_per_core=10.0)
    s = snap([req(0)], power=idle)
    assert checked(build("power").decide(s), s).bits == 32  # 10 J of headroom: fp32 costs 70 mJ


@pytest.mark.parametrize("rate", [0.0, 200.0, 300.0, 1000.0, 5000.0])
@pytest.mark.parametrize("name", ["power", "composite"])
def test_power_cap_chooses_bits_the_budget_could_sustain_at_the_arrival_rate(name: str, rate: float) -> None:
    """10 J of headroom pays for fp32 now, but at ``rate`` images/s the 10 W refill may not keep up with
    fp32 (42 mJ per image at best on the stand-in profile): then the most accurate bits that it could,
    the cheapest bits when none could."""
    idle = PowerState(budget_w=15.0, window_s=1.0, energy_in_window_j=5.0, idle_w=5.0, watts_per_core=10.0)
    s = dataclasses.replace(snap([req(0)], power=idle), arrival_rate=rate)
    bits = checked(build(name).decide(s), s).bits
    best_j = {b: min(LAT.cpu(b, n) / n for n in LAT.batches if n <= 32) * 10.0 for b in LAT.pareto}
    sustainable = [b for b in LAT.pareto if rate * best_j[b] <= 10.0] or [1]
    assert bits in sustainable
    assert ACC[bits] == max(ACC[b] for b in sustainable)
    assert (bits == 32) == (rate * best_j[32] <= 10.0)


def test_power_policy_budget_exhausted_waits_for_the_window_to_refill() -> None:
    spent = PowerState(budget_w=15.0, window_s=1.0, energy_in_window_j=15.0, idle_w=5.0, watts_per_core=10.0)
    s = snap([req(0, arrival=3.0)], now=3.0, power=spent)
    decision = checked(build("power").decide(s), s)
    assert decision.bits is None and decision.wait_until is not None and decision.wait_until > 3.0
    assert decision.reject == () and decision.hold  # arrivals behind the head cannot make the budget refill sooner
    # a request due before it could run after the wait is refused now, not left to expire during it
    due = decision.wait_until - 3.0 + LAT.latency(1, 1) / 2
    s = snap([req(0, arrival=3.0), req(1, arrival=3.0, slo_ms=1e3 * due)], now=3.0, power=spent)
    decision = checked(build("power", margin_ms=0.0).decide(s), s)
    assert decision.bits is None and decision.reject == (1,)
    # almost exhausted: only the cheapest bits fit, and only a part of the queue
    nearly = dataclasses.replace(spent, energy_in_window_j=15.0 - 0.05)
    s = snap([req(i) for i in range(32)], power=nearly)
    decision = checked(build("power").decide(s), s)
    assert decision.bits == 1 and 0 < len(decision.requests) < 32


def test_composite_budget_wait_holds_and_plans_from_its_end() -> None:
    spent = PowerState(budget_w=15.0, window_s=1.0, energy_in_window_j=15.0, idle_w=5.0, watts_per_core=10.0)
    s = snap([req(0, arrival=3.0)], now=3.0, power=spent)
    decision = checked(build("composite").decide(s), s)
    assert decision.bits is None and decision.hold and decision.reject == ()
    assert decision.wait_until is not None and decision.wait_until > 3.0
    due = decision.wait_until - 3.0 + LAT.latency(1, 1) / 2  # on time now, late once the wait has ended
    s = snap([req(0, arrival=3.0), req(1, arrival=3.0, slo_ms=1e3 * due)], now=3.0, power=spent)
    decision = checked(build("composite", margin_ms=0.0).decide(s), s)
    assert decision.bits is None and decision.reject == (1,)


def test_power_policy_spends_no_budget_on_late_answers() -> None:
    idle = PowerState(budget_w=15.0, window_s=1.0, energy_in_window_j=5.0, idle_w=5.0, watts_per_core=10.0)
    cheapest_alone = LAT.latency(1, 1)
    now = 0.05 - cheapest_alone - 0.001  # req 0 finishes 1 ms before its deadline even alone at 1 bit
    queue = [req(0), req(1, arrival=now), req(2, arrival=now)]
    s = snap(queue, now=now, power=idle)
    # within the default 2 ms margin: refused now, not served at the brink of its deadline
    decision = checked(build("power").decide(s), s)
    assert decision.reject == (0,) and 0 not in decision.requests and decision.requests[0] == 1
    # without a margin it still fits: served first, and the batch stops before it would be late
    decision = checked(build("power", margin_ms=0.0).decide(s), s)
    assert decision.reject == () and decision.requests[0] == 0
    assert now + LAT.latency(decision.bits, len(decision.requests)) <= 0.05


def _efficient_1bit() -> int:
    per_image = [LAT.cpu(1, n) / n for n in range(1, 33)]
    return next(n for n, j in enumerate(per_image, start=1) if j <= 1.15 * min(per_image))


@pytest.mark.parametrize("name", ["power", "composite"])
def test_power_policy_waits_for_an_efficient_batch_rather_than_spend_the_budget_on_a_small_one(name: str) -> None:
    """The window has room for one 1-bit image now; 32 requests wait with room in their deadlines: the
    policy waits until the budget pays for an efficient batch (energy per image within 15 % of the best)
    instead of running one image at a time at 1.7 x the energy per image. A head that cannot wait that
    long is served with what the budget allows now."""
    one_image_j = LAT.cpu(1, 1) * 10.0
    state = PowerState(budget_w=15.0, window_s=1.0, energy_in_window_j=15.0 - 1.2 * one_image_j, idle_w=5.0)
    state = dataclasses.replace(state, watts_per_core=10.0)
    size = _efficient_1bit()
    refilled = (LAT.cpu(1, size) * 10.0 - 1.2 * one_image_j) / 10.0  # at budget - idle = 10 W
    s = snap([req(i, slo_ms=500.0) for i in range(32)], power=state)
    decision = checked(build(name).decide(s), s)
    assert decision.bits is None and "efficient" in decision.reason
    assert decision.wait_until == pytest.approx(max(refilled, 1.0 / 200))  # (at least 1/200 of the window)
    # the same queue, the head due before the budget could pay for an efficient batch: served now, alone
    urgent = [req(0, slo_ms=1e3 * (refilled / 2 + LAT.latency(1, 1))), *(req(i, slo_ms=500.0) for i in range(1, 32))]
    s = snap(urgent, power=state)
    decision = checked(build(name, margin_ms=0.0).decide(s), s)
    assert decision.bits == 1 and decision.requests == (0,)


@pytest.mark.parametrize("name", ["power", "composite"])
def test_power_policy_in_overload_refuses_heads_that_cannot_wait_for_an_efficient_batch(name: str) -> None:
    """More arriving than the budget sustains even at 1 bit: a head due too soon for an efficient batch is
    refused rather than served alone (its energy would serve 1.7 x as many images of the queue behind it).
    With the arrival rate the budget sustains, the same head is served."""
    state = PowerState(budget_w=15.0, window_s=1.0, energy_in_window_j=15.0, idle_w=5.0, watts_per_core=10.0)
    size = _efficient_1bit()
    refilled = LAT.cpu(1, size) * 10.0 / 10.0
    head = req(0, slo_ms=1e3 * (refilled / 2 + LAT.latency(1, size)))  # due before an efficient batch could end
    queue = [head, *(req(i, slo_ms=500.0) for i in range(1, 32))]
    flooded = dataclasses.replace(snap(queue, power=state), arrival_rate=5000.0)  # 5000 x 0.72 mJ > 10 W
    decision = checked(build(name, margin_ms=0.0).decide(flooded), flooded)
    assert decision.reject == (0,) and decision.bits is None and decision.wait_until is not None
    # with the rate the budget sustains, and room in the window for one image: the same head is served now
    room = dataclasses.replace(state, energy_in_window_j=15.0 - 1.2 * LAT.cpu(1, 1) * 10.0)
    calm = dataclasses.replace(flooded, arrival_rate=100.0, power=room)
    decision = checked(build(name, margin_ms=0.0).decide(calm), calm)
    assert decision.reject == () and decision.requests[:1] == (0,)


def test_power_budget_below_idle_never_runs() -> None:
    state = PowerState(budget_w=4.0, window_s=1.0, energy_in_window_j=5.0, idle_w=5.0, watts_per_core=10.0)
    decision = build("power", budget_w=4.0).decide(snap([req(0)], power=state))
    assert decision.bits is None and "idle" in decision.reason


def test_composite_caps_by_power_then_chooses_by_slack() -> None:
    nearly = PowerState(budget_w=15.0, window_s=1.0, energy_in_window_j=15.0 - 0.02, idle_w=5.0, watts_per_core=10.0)
    s = snap([req(0)], power=nearly)
    decision = checked(build("composite").decide(s), s)
    assert decision.bits in (1,)  # 20 mJ: fp32 (70 mJ), 8 bits (38 mJ), 2 bits (30 mJ) do not fit
    exhausted = dataclasses.replace(nearly, energy_in_window_j=16.0)
    decision = checked(build("composite").decide(snap([req(0)], power=exhausted)), s)
    assert decision.bits is None and decision.wait_until is not None
    no_budget = build_policy("composite", {})
    assert no_budget.decide(s).bits == 32


def test_cascade_runs_low_and_escalates_auto_requests_only() -> None:
    queue = [req(0), req(1), req(2, preferred_bits=4)]
    s = snap(queue)
    decision = checked(build("cascade", efficient_batches=False).decide(s), s)
    assert decision.bits == 1 and set(decision.requests) == {0, 1}
    assert decision.escalate_below == 0.7 and decision.escalate_to == 8
    hinted = snap([req(2, preferred_bits=4)])
    decision = checked(build("cascade").decide(hinted), hinted)
    assert decision.bits == 4 and decision.escalate_to is None


def test_cascade_waits_for_an_efficient_batch_while_the_head_can_afford_it() -> None:
    policy = build("cascade")
    s = snap([req(0), req(1)])
    planner = Planner(s)
    target = planner.efficient_batch(1)
    assert target > 2  # the stand-in profile: a batch of two costs more per image than an efficient one
    waiting = checked(policy.decide(s), s)
    latest = 0.050 - 0.002 - planner.latency(1, target) - planner.latency(8, target)  # 2 ms margin by default
    assert waiting.bits is None and waiting.wait_until == pytest.approx(latest)
    no_margin = checked(build("cascade", margin_ms=0).decide(s), s)
    assert no_margin.wait_until == pytest.approx(latest + 0.002)
    # at the latest start it runs what is there
    late = snap([req(0), req(1)], now=latest)
    assert checked(policy.decide(late), late).bits == 1
    # an efficient batch runs at once
    full = snap([req(i) for i in range(target)])
    assert set(checked(policy.decide(full), full).requests) == set(range(target))
    # no deadline: nothing to wait for
    free = snap([req(0, slo_ms=None)])
    assert checked(policy.decide(free), free).bits == 1
    # a deadline too close for even the smallest wait runs now
    tight = snap([req(0, slo_ms=1.0)])
    assert checked(policy.decide(tight), tight).bits == 1


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("slo", {"hold_ms": -1}, "hold_ms"),
        ("slo", {"speed": 1}, "unknown settings ['speed']"),
        ("power", {}, "'budget_w' is required"),
        ("power", {"budget_w": "lots"}, "budget_w must be a number"),
        ("cascade", {"threshold": 1.5}, "threshold"),
        ("cascade", {"threshold": 0.5, "low_bits": 8, "high_bits": 2}, "must be below"),
        ("cascade", {"threshold": 0.5, "low_bits": 9}, "low_bits must be one of"),
        ("cascade", {"threshold": 0.5, "efficient_batches": 1}, "efficient_batches must be true or false"),
        ("cascade", {"threshold": 0.5, "margin_ms": -1}, "margin_ms"),
        ("queue", {"levels": [[5, 8]]}, "depth 0"),
        ("queue", {"levels": [[0, 8], [0, 1]]}, "increase"),
        ("queue", {"levels": [[0, 8], [4, 1]], "hysteresis": 4}, "hysteresis"),
        ("queue", {"levels": [[0, 9]]}, "each level"),
        ("composite", {"budget_w": 0}, "budget_w"),
        ("fixed-8", {"x": 1}, "takes no settings"),
        ("fixed-9", {}, "unknown policy"),
    ],
)
def test_invalid_settings_are_refused_with_the_name(name: str, options: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_policy(name, options)


def test_every_documented_name_is_registered() -> None:
    for name in ("fixed-1", "fixed-8", "fixed-32", "hint", "queue", "slo", "power", "cascade", "composite"):
        assert name in names()


def test_policies_import_only_numpy_and_the_stdlib() -> None:
    """The arrow of ARCHITECTURE.md: policies never import torch, onnxruntime, FastAPI or another room."""
    import sys

    allowed = set(sys.stdlib_module_names) | {"numpy", "policies"}
    for path in sorted(Path("policies").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{path} imports {roots}"
        source = path.read_text()
        for clock in ("time.time(", "time.monotonic(", "perf_counter(", "datetime.now("):
            assert clock not in source, f"{path} reads the clock ({clock})"
