"""Executor settings (env: EXECUTOR_* or BATON_*; the SDK also reads ANTHROPIC_API_KEY/ANTHROPIC_BASE_URL)."""

from __future__ import annotations

import msgspec

from shared.config import BaseSettings, Secret, load
from shared.errors import ConfigError


class Settings(BaseSettings, kw_only=True, frozen=True):
    stall_timeout_s: float = 30.0
    context_token_budget: int = 16000
    context_messages: int = 50
    coalesce_ms: float = 15.0
    coalesce_chars: int = 48
    system_prompt: str = "You are a helpful assistant. Answer clearly and concisely."
    anthropic_base_url: str = ""
    anthropic_api_key: Secret = Secret("")
    concurrency: int = 32
    outcome_publish_s: float = 60.0
    # A redelivered call's settle timer is due this long after its attempt's deadline (policy's
    # abort of a late call reports its exact usage first: policy's own settle_grace_s).
    settle_grace_s: float = 10.0
    # The allow-list of MCP servers tool tasks may reach: JSON, name -> streamable HTTP URL (or a
    # stdio command line as a list). A task naming a server not listed here is never sent.
    mcp_servers: str = "{}"

    def mcp_server_map(self) -> dict[str, str | list[str]]:
        try:
            return msgspec.json.decode(self.mcp_servers, type=dict[str, str | list[str]])
        except msgspec.DecodeError as exc:
            raise ConfigError(f"EXECUTOR_MCP_SERVERS: {exc}") from exc


def from_env() -> Settings:
    return load(Settings, "EXECUTOR")


def from_env_map(environ: dict[str, str]) -> Settings:
    return load(Settings, "EXECUTOR", environ)
