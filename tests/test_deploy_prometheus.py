"""deploy/prometheus: the scrape config, rules and rule unit tests pass promtool (and promtool catches a bad rule)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: `make test` installs Debian's prometheus")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def test_config_is_valid_and_finds_the_rules() -> None:
    result = promtool("check", "config", DEPLOY / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_rules_are_valid() -> None:
    rules = sorted((DEPLOY / "rules").glob("*.yml"))
    assert rules
    result = promtool("check", "rules", *rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", DEPLOY / "tests" / "apserve_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_three_alerts_exist() -> None:
    text = (DEPLOY / "rules" / "apserve.yml").read_text()
    for alert in ("ApserveSLOBurn", "ApserveQueueSaturated", "ApservePowerOverBudget"):
        assert f"alert: {alert}" in text


def test_promtool_fails_on_a_wrong_expectation(tmp_path: Path) -> None:
    """The rule tests can fail: the same rules with a wrong expected value are refused."""
    (tmp_path / "rules").symlink_to(DEPLOY / "rules")
    wrong = (DEPLOY / "tests" / "apserve_test.yml").read_text().replace("../rules/", "rules/")
    assert "value: 0.25" in wrong
    (tmp_path / "wrong_test.yml").write_text(wrong.replace("value: 0.25", "value: 0.5", 1))
    result = promtool("test", "rules", tmp_path / "wrong_test.yml")
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr
