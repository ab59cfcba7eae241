"""Agent settings (env: AGENT_* or BATON_*; the SDK also reads ANTHROPIC_API_KEY/ANTHROPIC_BASE_URL)."""

from __future__ import annotations

from shared.config import BaseSettings, Secret, load
from shared.messages import Prices


class Settings(BaseSettings, kw_only=True, frozen=True):
    model: str = "claude-haiku-4-5"
    model_timeout_s: float = 10.0
    # A redelivered message's settle timer is due this long after the model's timeout: by then
    # every call of its earlier deliveries that was going to start has written its record.
    settle_grace_s: float = 20.0
    max_tokens: int = 512
    context_messages: int = 12
    context_token_budget: int = 2000
    # USD per million tokens of ``model``, what its classification calls are billed at.
    price_input: float = 1.0
    price_output: float = 5.0
    price_cache_read: float = 0.1
    price_cache_write: float = 1.25
    anthropic_base_url: str = ""
    anthropic_api_key: Secret = Secret("")
    # Classification calls wait on the model, not the CPU: at 16 in flight a 0.5 s call capped
    # one agent at ~32 messages/s (baton bench, realistic pace; docs/benchmarks.md).
    concurrency: int = 128

    def prices(self) -> Prices:
        return Prices(
            input=self.price_input,
            output=self.price_output,
            cache_read=self.price_cache_read,
            cache_write=self.price_cache_write,
        )


def from_env() -> Settings:
    return load(Settings, "AGENT")
