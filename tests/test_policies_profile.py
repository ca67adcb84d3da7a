"""The profile file: parsing, the Pareto front, and clear errors for damaged files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policies.base import LatencyProfile
from policies.profile import ProfileError, load_profile, pareto_bits, parse_profile, standin_document


def write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "p.profile.json"
    path.write_text(json.dumps(doc))
    return path


def test_standin_round_trips_through_the_file(tmp_path: Path) -> None:
    prof = load_profile(write(tmp_path, standin_document()))
    assert prof.latency.latency(8, 1) == pytest.approx(0.0019)
    assert prof.latency.latency(1, 64) == pytest.approx(0.0006 * 64 * 0.6)
    assert prof.latency.latency(8, 12) == pytest.approx((prof.latency.latency(8, 8) + prof.latency.latency(8, 16)) / 2)
    assert prof.latency.cpu_seconds is not None and prof.latency.cpu_seconds[(8, 1)] == pytest.approx(0.0038)
    # 3 and 4 bits cost what 5 does and are less accurate: off the front
    assert prof.latency.pareto == (1, 2, 5, 6, 7, 8, 32)


def test_pareto_drops_dominated_bits() -> None:
    lat = LatencyProfile(table={(1, 1): 1.0, (2, 1): 2.0, (4, 1): 2.0, (8, 1): 3.0})
    assert pareto_bits(lat, {1: 0.8, 2: 0.85, 4: 0.9, 8: 0.89}, (1, 2, 4, 8)) == (1, 4)


def test_accuracy_from_the_manifest_when_the_file_has_none(tmp_path: Path) -> None:
    doc = standin_document()
    del doc["accuracy"]
    prof = parse_profile(doc, "x", accuracy={8: 0.9, 1: 0.8})
    assert prof.accuracy == {8: 0.9, 1: 0.8} and prof.latency.pareto == (1, 8)
    assert parse_profile(doc, "x").latency.pareto == prof.latency.bits  # nothing known: every profiled bits


def test_missing_cpu_time_assumes_all_threads_busy() -> None:
    doc = {"threads": 2, "rows": [{"bits": 8, "batch": 1, "ms_median": 2.0}]}
    assert parse_profile(doc).latency.cpu_seconds == {(8, 1): pytest.approx(0.004)}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "JSON object"),
        ({"rows": []}, "non-empty list"),
        ({"rows": [{"bits": 8, "batch": 1}]}, r"rows\[0\]: missing 'ms_median'"),
        ({"rows": [{"bits": 9, "batch": 1, "ms_median": 1}]}, "bits 9 not servable"),
        ({"rows": [{"bits": 8, "batch": 0, "ms_median": 1}]}, "batch must be a positive integer"),
        ({"rows": [{"bits": 8, "batch": 1, "ms_median": -1}]}, "positive number"),
        ({"rows": [{"bits": 8, "batch": 1, "ms_median": 1}] * 2}, "duplicate row"),
        ({"rows": [{"bits": 8, "batch": 2, "ms_median": 1}]}, "no batch-1 row"),
        ({"rows": [{"bits": 8, "batch": 1, "ms_median": 1}], "accuracy": {"8": 93}}, "fraction"),
        ({"rows": [{"bits": 8, "batch": 1, "ms_median": 1}], "pareto": [1]}, "no latency rows"),
    ],
)
def test_damaged_profiles_name_the_problem(tmp_path: Path, doc: object, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        load_profile(write(tmp_path, doc))


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(bad)


def test_rows_of_backends_not_chosen_are_ignored():
    """`apserve profile` writes a row per candidate backend; only the chosen backend's latency counts."""
    doc = {
        "rows": [
            {"bits": 8, "batch": 1, "backend": "onnxruntime-int8", "ms_median": 2.0},
            {"bits": 8, "batch": 1, "backend": "native-avx2", "ms_median": 9.0},
        ],
        "backends": {"8": "onnxruntime-int8"},
    }
    profile = parse_profile(doc)
    assert profile.latency.latency(8, 1) == pytest.approx(0.002)
