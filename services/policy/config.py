"""Policy settings (env: POLICY_* or BATON_*)."""

from __future__ import annotations

from typing import Literal

from shared.config import BaseSettings, load
from shared.errors import ConfigError


class Settings(BaseSettings, kw_only=True, frozen=True):
    default_model: str = "claude-sonnet-4-6"
    max_attempts: int = 3
    run_deadline_s: float = 300.0
    settle_grace_s: float = 10.0  # after a missed deadline, before dead calls are estimated
    max_output_tokens: int = 4096
    policy_file: str = ""  # BATON_POLICY_FILE: per-project rules (docs/policy.md)
    policy_reload_s: float = 2.0  # how often the file's mtime is checked
    double_texting: Literal["enqueue", "reject", "interrupt"] = "enqueue"
    # Seconds before attempt 2, 3, …, comma-separated; the last value repeats.
    retry_backoff_s: str = "1.0,4.0"
    fallback_model: str = ""


def backoff(value: str) -> tuple[float, ...]:
    """``"1,4"`` → ``(1.0, 4.0)``; refuses anything but non-negative numbers."""
    try:
        out = tuple(float(x) for x in value.replace(" ", "").split(",") if x)
    except ValueError as exc:
        raise ConfigError(f"POLICY_RETRY_BACKOFF_S: not a list of seconds: {value!r}") from exc
    if any(x < 0 or x != x or x > 3600 for x in out):
        raise ConfigError(f"POLICY_RETRY_BACKOFF_S: each value must be 0..3600: {value!r}")
    return out


def from_env() -> Settings:
    settings = load(Settings, "POLICY")
    backoff(settings.retry_backoff_s)  # a bad value stops the start, not a retry later
    return settings
