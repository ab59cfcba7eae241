"""Retention and the hot window from the policy file: read by policy (strictly) and by the
persister and provisioning (shared/retention.py), and carried to the executor in each task."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.policy import core, policyfile
from services.policy.phase import Running
from shared import retention, subjects

FILE = b"""
[defaults]
retention_days = 90
context_messages = 100

[projects.short]
retention_days = 7

[projects.chatty]
context_messages = 400

[projects.other]
max_attempts = 2
"""


def test_retention_and_window_merge_onto_the_defaults_per_project() -> None:
    r = retention.parse(FILE)
    assert r.for_project("anyone") == retention.Keep(retention_days=90, context_messages=100)
    assert r.for_project("short") == retention.Keep(retention_days=7, context_messages=100)
    assert r.for_project("chatty") == retention.Keep(retention_days=90, context_messages=400)
    assert r.for_project("other") == retention.Keep(retention_days=90, context_messages=100)
    assert r.shortest_days() == 7


def test_no_file_or_no_keys_means_nothing_expires() -> None:
    assert retention.load(None) == retention.Retention()
    assert not retention.parse(b"[defaults]\nmax_attempts = 2\n").limited


@pytest.mark.parametrize(
    "text",
    [
        b"[defaults]\nretention_days = 0\n",
        b"[defaults]\nretention_days = '90'\n",
        b"[projects.x]\ncontext_messages = -1\n",
        b"[defaults]\nretention_days = 90.5\n",
    ],
)
def test_a_bad_retention_key_is_refused_by_both_readers(text: bytes) -> None:
    with pytest.raises(retention.RetentionError):
        retention.parse(text)
    with pytest.raises(policyfile.PolicyFileError):
        policyfile.parse(text)


def test_policy_accepts_the_keys_and_puts_the_window_into_every_task() -> None:
    book = policyfile.parse(FILE)
    assert book.rules_for("anyone").context_messages == 100
    assert book.rules_for("chatty").context_messages == 400
    state = core.RunState(
        run_id="run-1",
        message_id="1",
        conversation_id="c",
        project_id="chatty",
        user_id="u",
        phase=Running(),
        verdict="approve",
        reason="",
    )
    task = core.task_for(
        state, datetime.now(UTC), context_messages=book.rules_for("chatty").context_messages
    )
    assert task.context_messages == 400
    # Without the key the task says 0: the executor's own EXECUTOR_CONTEXT_MESSAGES applies.
    assert policyfile.parse(b"").rules_for("x").context_messages == 0


def test_a_content_streams_max_age_never_outlives_the_shortest_retention() -> None:
    r = retention.parse(FILE)
    week = 7 * retention.DAY_S
    assert retention.stream_max_age_s(30 * retention.DAY_S, r) == week
    assert retention.stream_max_age_s(3600.0, r) == 3600.0  # already shorter: kept
    assert retention.stream_max_age_s(30 * retention.DAY_S, retention.Retention()) == (
        30 * retention.DAY_S
    )
    assert subjects.STREAM_CHAT_IN  # the streams provisioning caps are the content streams


def test_the_shipped_example_policy_file_declares_the_seed_retention() -> None:
    example = Path(__file__).resolve().parents[2] / "policy.example.toml"
    r = retention.load(example)
    assert r.defaults == retention.Keep(retention_days=90, context_messages=100)
    policyfile.load(example)  # and policy still accepts the whole file


def test_provisioning_caps_every_content_stream_at_the_shortest_retention() -> None:
    from baton.provision import stream_config

    kept = retention.parse(b"[defaults]\nretention_days = 2\n")
    for spec in subjects.STREAMS:
        cfg = stream_config(spec, 120.0, 1, kept)
        assert cfg.max_age is not None
        if spec.name == "CONVERSATIONS":  # the tombstones outlive what they delete
            assert cfg.max_age == spec.max_age_s
        else:
            assert cfg.max_age == min(spec.max_age_s, 2 * retention.DAY_S), spec.name
