"""The scheduler on its own, driven by small test policies: every Decision field is honoured (reject,
wait_until, escalate_below/escalate_to), snapshots are in priority/EDF order, draining answers everything."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from policies.base import ALL_BITS, Decision, LatencyProfile, Snapshot
from server.metrics import Metrics
from server.protocol import Hint, RequestOptions
from server.scheduler import Refused, Scheduler, SchedulerConfig, yield_to_event_loop

PROFILE = LatencyProfile(table={(b, 1): 0.001 for b in ALL_BITS})


class ConfidenceEngine:
    """At bits < 8 an image whose first pixel is 0 gets flat logits (unsure); otherwise a confident class 0."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int]]] = []

    def run(self, batch: np.ndarray, bits: int) -> np.ndarray:
        firsts = [int(v) for v in batch.reshape(batch.shape[0], -1)[:, 0]]
        self.calls.append((bits, firsts))
        logits = np.zeros((batch.shape[0], 10), dtype=np.float32)
        for i, first in enumerate(firsts):
            if first or bits >= 8:
                logits[i, 0] = 50.0
        logits[:, 9] = bits / 1000  # which bits computed each row, without changing its confidence much
        return logits


@dataclass
class ScriptedPolicy:
    """Calls ``script(snapshot, call_number)`` and records the snapshots it saw."""

    script: Callable[[Snapshot, int], Decision]
    name: str = "scripted"
    seen: list[Snapshot] = field(default_factory=list)

    def decide(self, snapshot: Snapshot) -> Decision:
        self.seen.append(snapshot)
        return self.script(snapshot, len(self.seen))


def _scheduler(policy: ScriptedPolicy, engine: ConfidenceEngine | None = None) -> Scheduler:
    config = SchedulerConfig(
        max_batch_size=16,
        max_queue_size=16,
        max_queue_delay_s=0.0,
        workers=1,
        default_bits=8,
        default_priority=2,
        default_timeout_s=None,
        servable=ALL_BITS,
        accuracy={b: 0.9 for b in ALL_BITS},
    )
    return Scheduler(engine or ConfidenceEngine(), policy, PROFILE, config, Metrics())


def _image(first: int) -> np.ndarray:
    image = np.zeros((1, 784), dtype=np.uint8)
    image[0, 0] = first
    return image


OPTIONS = RequestOptions(Hint(), None, 0)


def test_escalation_reruns_unsure_requests_at_higher_bits() -> None:
    def script(snapshot: Snapshot, _: int) -> Decision:
        if len(snapshot.queue) < 3 and not any(r.strict for r in snapshot.queue):
            return Decision(bits=None)  # hold until the test's three requests are queued
        escalated = [r.id for r in snapshot.queue if r.strict]
        if escalated:
            return Decision(bits=8, requests=tuple(escalated), reason="escalated")
        ids = tuple(r.id for r in snapshot.queue)
        return Decision(bits=1, requests=ids, reason="cascade", escalate_below=0.9, escalate_to=8)

    async def test() -> None:
        engine = ConfidenceEngine()
        scheduler = _scheduler(ScriptedPolicy(script), engine)
        scheduler.start()
        sure, unsure = scheduler.submit(_image(7), OPTIONS), scheduler.submit(_image(0), OPTIONS)
        mixed = scheduler.submit(np.concatenate([_image(9), _image(0)]), OPTIONS)  # one sure row, one unsure
        a, b, c = await sure, await unsure, await mixed
        await scheduler.drain()
        assert a.bits == 1 and b.bits == 8 and c.bits == 8
        assert engine.calls == [(1, [7, 0, 9, 0]), (8, [0, 0])]  # only the unsure rows ran again
        np.testing.assert_allclose(c.logits[:, 9], [0.001, 0.008])  # the sure row kept its 1-bit answer
        assert c.logits.shape == (2, 10) and b.compute_us >= a.compute_us  # both batches counted

    asyncio.run(test())


def test_policy_rejects_are_answered_and_wait_until_is_honoured() -> None:
    waited_at: list[float] = []

    def script(snapshot: Snapshot, call: int) -> Decision:
        if len(snapshot.queue) < 2 and not waited_at:
            return Decision(bits=None)  # hold until both requests are queued
        if not waited_at:
            waited_at.append(snapshot.now)
            hopeless = tuple(r.id for r in snapshot.queue if r.priority == 3)
            return Decision(bits=None, reject=hopeless, wait_until=snapshot.now + 0.05, reason="too late")
        return Decision(bits=4, requests=tuple(r.id for r in snapshot.queue), reason="go")

    async def test() -> None:
        policy = ScriptedPolicy(script)
        scheduler = _scheduler(policy)
        scheduler.start()
        hopeless = scheduler.submit(_image(1), RequestOptions(Hint(), None, 3))
        served = scheduler.submit(_image(2), OPTIONS)
        with pytest.raises(Refused) as refused:
            await hopeless
        assert refused.value.status == 503 and "too late" in refused.value.message
        assert (await served).bits == 4
        # nothing arrives after the wait decision: only the wait_until timer can have asked the policy again
        served_at = policy.seen[-1].now
        assert served_at - waited_at[0] >= 0.049
        await scheduler.drain()

    asyncio.run(test())


def test_a_holding_wait_is_not_asked_again_by_arrivals_behind_its_head() -> None:
    """Decision.hold (power waiting for its budget): arrivals that queue behind the head do not ask the
    policy again before wait_until; one that could not finish by its deadline starting then is refused at
    once (503, not left to expire); one that goes ahead of the head (a higher priority) asks again."""
    hold_s = 0.2

    def script(snapshot: Snapshot, call: int) -> Decision:
        if call == 1:
            return Decision(bits=None, wait_until=snapshot.now + hold_s, reason="budget", hold=True)
        return Decision(bits=None, wait_until=snapshot.now + hold_s, reason="budget again", hold=True)

    async def test() -> None:
        policy = ScriptedPolicy(script)
        scheduler = _scheduler(policy)
        scheduler.start()
        first = scheduler.submit(_image(1), RequestOptions(Hint(), None, 1))  # asks: hold for 200 ms
        behind = [scheduler.submit(_image(i), OPTIONS) for i in range(2, 6)]  # priority 2: behind it
        assert len(policy.seen) == 1 and scheduler.queue_depth == 5
        with pytest.raises(Refused) as refused:  # behind, 100 ms to its deadline, the hold ends in 200 ms
            scheduler.submit(_image(9), RequestOptions(Hint(), 0.1, 2))
        assert refused.value.status == 503 and "holds its batches" in refused.value.message
        urgent = scheduler.submit(_image(7), RequestOptions(Hint(), 5.0, 1))  # a deadline, ahead of the head
        assert len(policy.seen) == 2 and policy.seen[-1].queue[0].deadline is not None
        await asyncio.sleep(hold_s + 0.05)  # the hold's timer asks again (and holds again)
        assert len(policy.seen) == 3
        for future in (first, urgent, *behind):
            future.cancel()
        scheduler.set_policy(ScriptedPolicy(lambda s, _: Decision(bits=1, requests=tuple(r.id for r in s.queue))))
        await scheduler.drain()

    asyncio.run(test())


def test_snapshot_queue_is_priority_then_deadline_order() -> None:
    def script(snapshot: Snapshot, _: int) -> Decision:
        return Decision(bits=None)  # hold everything; the test only looks at the snapshot

    async def test() -> None:
        policy = ScriptedPolicy(script)
        scheduler = _scheduler(policy)
        scheduler.start()
        futures = [
            scheduler.submit(_image(1), RequestOptions(Hint(), None, 3)),
            scheduler.submit(_image(2), RequestOptions(Hint(), 10.0, 1)),
            scheduler.submit(_image(3), RequestOptions(Hint(), 5.0, 1)),
            scheduler.submit(_image(4), RequestOptions(Hint(), None, 0)),
        ]
        await asyncio.sleep(0.05)
        queue = policy.seen[-1].queue
        assert [r.id for r in queue] == [3, 2, 4, 1]
        assert [r.priority for r in queue] == [1, 1, 2, 3]
        scheduler.close()  # the policy serves nothing: draining must still answer every request
        await scheduler.drain()
        for future in futures:
            with pytest.raises(Refused) as refused:
                await future
            assert refused.value.status == 503
        with pytest.raises(Refused):
            scheduler.submit(_image(5), OPTIONS)

    asyncio.run(test())


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling calls")
def test_worker_threads_run_below_the_event_loop() -> None:
    seen: dict[str, int] = {}

    def worker() -> None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        yield_to_event_loop()
        seen["before"], seen["after"] = before, os.getpriority(os.PRIO_PROCESS, tid)

    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        pytest.skip("the test process runs under a real-time policy")
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["after"] == min(19, seen["before"] + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == seen["before"]  # the caller is unchanged
