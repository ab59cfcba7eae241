"""Policy settings (env: POLICY_* or BATON_*)."""

from __future__ import annotations

from shared.config import BaseSettings, load


class Settings(BaseSettings, kw_only=True, frozen=True):
    default_model: str = "claude-sonnet-4-6"
    max_attempts: int = 3
    run_deadline_s: float = 300.0
    max_output_tokens: int = 4096
    policy_file: str = ""  # BATON_POLICY_FILE: per-project rules (docs/policy.md)
    policy_reload_s: float = 2.0  # how often the file's mtime is checked


def from_env() -> Settings:
    return load(Settings, "POLICY")
