"""Policy's pure part of a conversation's settings: the model verdict and its use in decisions."""

from __future__ import annotations

import pytest

from services.policy import core
from shared import messages as m
from tests.unit.test_policy_core import BIG, IDS, NOW, RULES, SMALL


def decide(conversation_model: str | None, hint: str | None = None) -> core.RunState:
    d = m.Decision(
        intent="question",
        complexity="low",
        action="answer",
        executor="chat",
        estimated_tokens=300,
        model_hint=hint,
    )
    e = m.AgentDecision(event_id="d1", **IDS, user_id="alice", decision=d)
    return core.decide(e, RULES, NOW, conversation_model=conversation_model)


@pytest.mark.parametrize(
    ("requested", "allowed"), [("small", True), ("big", True), ("gpt-9", False), ("", False)]
)
def test_a_model_is_allowed_when_the_projects_price_table_lists_it(
    requested: str, allowed: bool
) -> None:
    ok, reason = core.model_verdict(requested, RULES)
    assert ok is allowed
    assert requested in reason
    if not allowed:
        assert "big, small" in reason  # says which ones are


def test_the_conversations_model_wins_over_the_agents_hint() -> None:
    s = decide("big", hint="small")
    assert (s.model, s.prices) == ("big", BIG)
    assert "the conversation's model big" in s.reason


def test_without_a_conversation_model_the_hint_and_default_apply_as_before() -> None:
    assert decide(None).model == "small"
    assert decide(None, hint="big").model == "big"


def test_a_conversation_model_the_project_no_longer_allows_is_not_used() -> None:
    s = decide("retired-model")
    assert (s.model, s.prices) == ("small", SMALL)
