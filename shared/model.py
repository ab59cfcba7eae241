"""The Anthropic client as every model-facing service builds it: SDK retries off, explicit timeouts."""

from __future__ import annotations

import anthropic


def client(
    base_url: str, api_key: str, timeout_s: float, connect_s: float = 5.0
) -> anthropic.AsyncAnthropic:
    """An ``AsyncAnthropic`` that never retries on its own: retries are policy's decision.

    Empty ``base_url``/``api_key`` leave the SDK to its own ``ANTHROPIC_*`` environment.
    """
    kwargs: dict[str, object] = {}
    if base_url:
        kwargs["base_url"] = base_url
    if api_key:
        kwargs["api_key"] = api_key
    return anthropic.AsyncAnthropic(
        max_retries=0,
        timeout=anthropic.Timeout(timeout_s, connect=connect_s),
        **kwargs,  # type: ignore[arg-type]
    )
