"""The profiler: file format, correctness checks, backend choice, Pareto set, load-or-profile."""

from __future__ import annotations

import json

import pytest

from kernels import profiler
from server.cli import main


def test_pareto_keeps_only_undominated_bits():
    latency = {1: 1.0, 2: 2.0, 4: 3.0, 8: 3.0, 32: 10.0}
    accuracy = {1: 0.80, 2: 0.88, 4: 0.90, 8: 0.89, 32: 0.91}
    assert profiler.pareto(latency, accuracy) == [1, 2, 4, 32]


@pytest.fixture(scope="module")
def small_profile(bundled):
    return profiler.profile(bundled, threads=1, batches=(1, 2), bits_list=(1, 32), check_images=16, progress=False)


def test_profile_format(small_profile, bundled):
    p = small_profile
    assert set(p) >= {"fingerprint", "model_sha256", "threads", "rows", "backends", "accuracy", "pareto"}
    assert p["model_sha256"] == bundled.manifest["payload_sha256"] and p["threads"] == 1
    assert p["backends"]["32"] == "onnxruntime-fp32"
    # the choice is the fastest correct candidate (which one wins depends on the machine and its load)
    candidates = {r["backend"] for r in p["rows"] if r["bits"] == 1}
    assert any(c.startswith("native-") for c in candidates) and p["backends"]["1"] in candidates
    total = {c: sum(r["ms_median"] for r in p["rows"] if r["bits"] == 1 and r["backend"] == c) for c in candidates}
    assert total[p["backends"]["1"]] == min(total.values())
    for row in p["rows"]:
        assert set(row) == {"bits", "batch", "backend", "ms_median", "ms_p90", "cpu_ms"}
        assert row["ms_p90"] >= row["ms_median"] > 0
    assert {(r["bits"], r["batch"]) for r in p["rows"]} == {(b, n) for b in (1, 32) for n in (1, 2)}
    assert all(c["correct"] and c["agreement"] == 1.0 for c in p["checks"])
    assert set(p["pareto"]) <= {1, 32} and p["pareto"]


def test_for_this_machine_reuses_a_matching_file_and_caches_a_quick_profile_for_a_foreign_one(
    small_profile, bundled, tmp_path, monkeypatch
):
    path, cache = profiler.save(small_profile, tmp_path / "p.json"), tmp_path / "cache"
    monkeypatch.setattr(profiler, "profile", lambda *a, **k: pytest.fail("re-profiled a matching profile"))
    assert profiler.for_this_machine(bundled, path, 1, cache) == (small_profile, path)

    foreign = dict(small_profile, fingerprint={**small_profile["fingerprint"], "cpu": "another CPU"})
    profiler.save(foreign, path)
    asked = []
    monkeypatch.setattr(profiler, "profile", lambda *a, **k: asked.append(k) or dict(small_profile, created="fresh"))
    fresh, where = profiler.for_this_machine(bundled, path, 1, cache)
    assert fresh["created"] == "fresh" and asked[0]["defaults_only"] and asked[0]["check_images"] < 1000
    assert where == profiler.cache_path(bundled, 1, cache) and json.loads(where.read_text())["created"] == "fresh"
    assert json.loads(path.read_text()) == foreign  # the given file is left alone
    assert profiler.for_this_machine(bundled, path, 1, cache) == (fresh, where) and len(asked) == 1
    assert profiler.cache_path(bundled, 2, cache) != where  # another thread count is another profile


def test_cli_refuses_bad_batches(capsys):
    with pytest.raises(SystemExit, match="--batches"):
        main(["profile", "--batches", "0,x"])
