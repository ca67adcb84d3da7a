"""server/power.py: the model meter's arithmetic, RAPL counters (a fake powercap tree), source choice."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from policies.profile import standin_profile
from server.power import ModelMeter, PowerError, PowerSettings, RaplMeter, make_meter, meter_from_settings

LAT = standin_profile().latency


def fake_rapl(root: Path, uj: int = 1_000_000, wrap: int = 2**32) -> Path:
    zone = root / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text(str(uj))
    (zone / "max_energy_range_uj").write_text(str(wrap))
    sub = root / "intel-rapl:0:0"  # a sub-zone (core): inside the package, never counted twice
    sub.mkdir()
    (sub / "energy_uj").write_text("5")
    (sub / "max_energy_range_uj").write_text(str(wrap))
    return zone / "energy_uj"


def test_model_meter_counts_idle_and_busy_energy_in_the_window() -> None:
    meter = ModelMeter(LAT, PowerSettings(source="model", watts_per_core=10, idle_w=5, window_s=1.0, budget_w=20))
    assert meter.state(100.0).energy_in_window_j == pytest.approx(5.0)
    # 8 bits, batch 1: the profile says 3.8 CPU-ms -> 10 W * 3.8 ms = 38 mJ, spread over the 4 ms it ran
    assert LAT.cpu(8, 1) == pytest.approx(0.0038)
    joules = meter.record_batch(8, 1, 0.004, end=100.0)
    assert joules == pytest.approx(0.038)
    state = meter.state(100.0)
    assert state.energy_in_window_j == pytest.approx(5.038)
    assert (state.source, state.budget_w, state.watts_per_core) == ("model", 20, 10)
    assert meter.state(100.996).energy_in_window_j == pytest.approx(5.038)
    assert meter.state(100.998).energy_in_window_j == pytest.approx(5.019)  # half the batch left the window
    assert meter.state(102.0).energy_in_window_j == pytest.approx(5.0)
    # a batch stretched by other work on its core (the HTTP front end) costs what the profile says
    assert meter.record_batch(8, 1, 0.012, end=200.0) == pytest.approx(0.038)


def test_rapl_meter_reads_counters_and_undoes_wrap_around(tmp_path: Path) -> None:
    counter = fake_rapl(tmp_path, uj=2**32 - 1_000_000)
    meter = make_meter(LAT, PowerSettings(window_s=1.0, idle_w=5.0), root=tmp_path)
    assert isinstance(meter, RaplMeter) and meter.source == "rapl" and len(meter.counters) == 1
    t0 = meter._samples[0][0]
    counter.write_text(str(2_000_000))  # wrapped: 1 J before the wrap + 2 J after
    assert meter.record_batch(8, 1, 0.5, end=t0 + 0.5) == pytest.approx(3.0)
    counter.write_text(str(4_000_000))
    state = meter.state(t0 + 1.0)
    assert state.energy_in_window_j == pytest.approx(5.0) and state.source == "rapl"
    counter.write_text(str(5_000_000))
    assert meter.state(t0 + 1.5).energy_in_window_j == pytest.approx(6.0 - 3.0)  # the sample at t0 + 0.5
    assert meter.state(t0 + 1.75).energy_in_window_j == pytest.approx(6.0 - 4.0)  # interpolated at t0 + 0.75
    assert meter.total_energy_j == pytest.approx(6.0)


def test_source_choice(tmp_path: Path) -> None:
    empty = tmp_path / "none"
    empty.mkdir()
    assert isinstance(make_meter(LAT, PowerSettings(), root=empty), ModelMeter)  # auto falls back
    with pytest.raises(PowerError, match="no readable counter"):
        make_meter(LAT, PowerSettings(source="rapl"), root=empty)
    fake_rapl(tmp_path / "rapl")
    assert isinstance(make_meter(LAT, PowerSettings(source="model"), root=tmp_path / "rapl"), ModelMeter)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"source": "gas"}, "source"),
        ({"window_s": 0}, "window_s"),
        ({"budget_w": -1}, "budget_w"),
        ({"idle_w": -1}, "idle_w"),
    ],
)
def test_invalid_power_settings(kw: dict, message: str) -> None:
    with pytest.raises(PowerError, match=message):
        PowerSettings(**kw)


def test_meter_from_server_settings_takes_the_policy_budget() -> None:
    settings = SimpleNamespace(policy_options={"budget_w": 12}, power_source="model")
    meter = meter_from_settings(settings, LAT)
    assert isinstance(meter, ModelMeter) and meter.state(0.0).budget_w == 12.0
