"""Cascade threshold calibration on per-bits outputs (synthetic here; scripts/calibrate_cascade.py feeds
it the engine's outputs on the validation split)."""

from __future__ import annotations

import numpy as np
import pytest

from policies.cascade import calibrate


def outputs(rng: np.random.Generator, labels: np.ndarray, accuracy: float, confidence: float) -> np.ndarray:
    """Logits that are right with probability ``accuracy``; right rows more confident than wrong ones."""
    n = len(labels)
    right = rng.random(n) < accuracy
    pred = np.where(right, labels, (labels + 1 + rng.integers(0, 9, n)) % 10)
    logits = rng.normal(0, 1, (n, 10))
    logits[np.arange(n), pred] += np.where(right, confidence, confidence / 3) + rng.normal(0, 1, n)
    return logits


def test_threshold_reaches_the_target_with_the_fewest_reruns() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    low, high = outputs(rng, labels, 0.85, 6.0), outputs(rng, labels, 0.93, 6.0)
    acc_high = float((high.argmax(1) == labels).mean())
    cal = calibrate(low, high, labels, target_accuracy=acc_high - 0.002)
    assert cal.accuracy >= acc_high - 0.002
    assert 0 < cal.escalated_fraction < 0.5  # confidence separates: most rows stay at low bits
    # recompute by hand: escalate rows whose low-bits top probability is below the threshold
    p = np.exp(low - low.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    up = p.max(1) < cal.threshold
    pred = np.where(up, high.argmax(1), low.argmax(1))
    assert up.mean() == pytest.approx(cal.escalated_fraction)
    assert (pred == labels).mean() == pytest.approx(cal.accuracy)
    # the smallest such threshold: escalating one row fewer misses the target
    fewer = np.sort(p.max(1))[up.sum() - 1]
    up2 = p.max(1) < fewer
    assert (np.where(up2, high.argmax(1), low.argmax(1)) == labels).mean() < cal.target_accuracy
    assert cal.accuracy_kept > cal.accuracy_low  # the rows kept at low bits are the confident ones


def test_softmax_inputs_work_as_logits_do() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 500)
    low, high = outputs(rng, labels, 0.8, 5.0), outputs(rng, labels, 0.95, 5.0)
    soft = np.exp(low) / np.exp(low).sum(1, keepdims=True)
    a = calibrate(low, high, labels, 0.9)
    b = calibrate(soft, high, labels, 0.9)
    assert a.escalated_fraction == b.escalated_fraction and a.accuracy == b.accuracy


def test_trivial_and_unreachable_targets() -> None:
    labels = np.array([0, 1, 2, 3])
    right = np.eye(10)[labels] * 5
    assert calibrate(right, right, labels, 1.0).escalated_fraction == 0.0
    wrong = np.eye(10)[(labels + 1) % 10] * 5
    assert calibrate(wrong, right, labels, 1.0).escalated_fraction == 1.0
    with pytest.raises(ValueError, match="unreachable"):
        calibrate(wrong, wrong, labels, 0.5)
    with pytest.raises(ValueError, match="rows"):
        calibrate(right[:3], right, labels, 0.5)
    with pytest.raises(ValueError, match="target_accuracy"):
        calibrate(right, right, labels, 0.0)


def test_calibration_script_escalates_to_the_cheapest_bits_as_accurate_as_8() -> None:
    import importlib.util
    from pathlib import Path

    from model_store import artifact
    from policies.profile import load_profile

    path = Path(__file__).resolve().parents[1] / "scripts" / "calibrate_cascade.py"
    spec = importlib.util.spec_from_file_location("calibrate_cascade", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = artifact.load()
    bits = script.escalation_bits(model, artifact.BUNDLED)
    accuracy = model.accuracy("validation")
    prof = load_profile(artifact.BUNDLED.with_suffix(".profile.json"), accuracy)
    assert bits in prof.latency.pareto and accuracy[bits] >= accuracy[8]
    assert prof.latency.latency(bits, 32) <= prof.latency.latency(8, 32)
    # no profile beside the model: the reference bits themselves
    assert script.escalation_bits(model, Path("/nonexistent/model.apm")) == 8
