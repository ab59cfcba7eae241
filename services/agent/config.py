"""Agent settings (env: AGENT_* or BATON_*; the SDK also reads ANTHROPIC_API_KEY/ANTHROPIC_BASE_URL)."""

from __future__ import annotations

from shared.config import BaseSettings, Secret, load
from shared.messages import Prices

# A settle timer is due within this of its publishing (well inside the hour the calls' records
# are kept, and the agent's refusal of a timer due later: core.SETTLE_MAX_AHEAD).
SETTLE_WINDOW_MAX_S = 1800.0


class Settings(BaseSettings, kw_only=True, frozen=True):
    model: str = "claude-haiku-4-5"
    model_timeout_s: float = 10.0
    # A redelivered message's settle timer is due this long after the model's timeout: by then
    # every call of its earlier deliveries that was going to start has written its record.
    settle_grace_s: float = 20.0
    # A call whose message_start comes this long after its delivery began is late (another
    # delivery may have read its record before it was written): it first sends a timer for
    # itself. At most the timeout plus the grace, so a record later than a redelivery's timer
    # always sends its own (docs/decisions.md, "An agent's overlapping deliveries").
    settle_late_s: float = 20.0
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

    def __post_init__(self) -> None:
        window = self.model_timeout_s + self.settle_grace_s
        if not (
            self.model_timeout_s > 0
            and self.settle_grace_s >= 0
            and 0 < self.settle_late_s <= window <= SETTLE_WINDOW_MAX_S
        ):
            raise ValueError(
                "need AGENT_MODEL_TIMEOUT_S > 0, AGENT_SETTLE_GRACE_S >= 0 and 0 < "
                "AGENT_SETTLE_LATE_S <= AGENT_MODEL_TIMEOUT_S + AGENT_SETTLE_GRACE_S <= "
                f"{SETTLE_WINDOW_MAX_S:.0f}"
            )

    def prices(self) -> Prices:
        return Prices(
            input=self.price_input,
            output=self.price_output,
            cache_read=self.price_cache_read,
            cache_write=self.price_cache_write,
        )


def from_env() -> Settings:
    return load(Settings, "AGENT")
