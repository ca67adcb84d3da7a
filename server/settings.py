"""The one settings object of the serving process.

Precedence, highest first: command-line flags, ``APSERVE_*`` environment variables, the YAML config file
(``--config``), the defaults below. An invalid value stops the start with a message naming the setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model_store.artifact import BITS, BUNDLED


class SettingsError(ValueError):
    """A setting is invalid; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APSERVE_", extra="forbid", validate_default=True)

    model_path: Path = Field(BUNDLED, description="artifact file to serve")
    model_name: str = Field("fashion-resnet", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="worker threads running batches concurrently")
    engine_threads: int = Field(1, ge=1, le=256, description="threads the engine uses inside one batch")
    max_batch_size: int = Field(32, ge=1, le=1024, description="images per batch, also the largest request")
    max_queue_delay_ms: float = Field(
        0.0, ge=0.0, le=10_000.0, description="how long a partial batch may wait for more requests"
    )
    max_queue_size: int = Field(256, ge=1, le=1_000_000, description="queued requests before 429")
    policy: str = Field("hint", description="policy name: fixed-K, hint, queue, slo, power, cascade, composite")
    policy_options: dict[str, Any] = Field(default_factory=dict)
    default_bits: int = Field(8, description="bits when neither the request nor the policy says")
    slo_ms: float | None = Field(None, gt=0.0, description="deadline of requests that carry none (None: no deadline)")
    priority_levels: int = Field(3, ge=1, le=100, description="valid request priorities are 1..priority_levels")
    default_priority: int = Field(2, ge=1, description="priority of requests that send 0 or none")
    power_source: str = Field("auto", pattern=r"^(auto|rapl|model)$", description="rapl counters or the power model")
    power_watts_per_core: float = Field(10.0, gt=0.0, description="power model: watts per busy core")
    power_idle_w: float = Field(5.0, ge=0.0, description="power model: idle watts")
    power_window_s: float = Field(1.0, gt=0.0, description="rolling window of the power budget")
    admin_token: SecretStr | None = Field(None, description="bearer token for /v1/policy; unset: admin API off")
    profile_path: Path | None = Field(None, description="latency profile JSON (default: beside the model)")
    profile_on_start: bool = Field(
        True, description="at start, a quick profile of this machine when the profile was made on other hardware"
    )
    profile_cache_dir: Path | None = Field(
        None, description="where quick profiles are kept, one per machine and model (default: ~/.cache/apserve)"
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    shutdown_grace_s: float = Field(0.0, ge=0.0, le=300.0, description="readiness false this long before draining")
    log_level: str = Field("info", pattern=r"^(critical|error|warning|info|debug|trace)$")

    @field_validator("default_bits")
    @classmethod
    def _servable_bits(cls, bits: int) -> int:
        if bits not in BITS:
            raise ValueError(f"must be one of {list(BITS)}")
        return bits

    @field_validator("admin_token")
    @classmethod
    def _empty_token_is_none(cls, token: SecretStr | None) -> SecretStr | None:
        return token if token is not None and token.get_secret_value() else None

    @model_validator(mode="after")
    def _priority_in_levels(self) -> Settings:
        if self.default_priority > self.priority_levels:
            raise ValueError(f"default_priority {self.default_priority} > priority_levels {self.priority_levels}")
        return self

    @property
    def resolved_profile_path(self) -> Path:
        return self.profile_path or self.model_path.with_suffix(".profile.json")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SettingsError(f"config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        problems.append(f"{name}: {err['msg']}")
    return "invalid setting " + "; ".join(problems)


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Settings from flags (``overrides``; None values are ignored), environment and an optional YAML file."""
    values = _read_config(config) if config is not None else {}
    env = {k.upper() for k in os.environ}
    # the environment outranks the file: drop file values the environment sets
    values = {k: v for k, v in values.items() if f"APSERVE_{k.upper()}" not in env}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
