"""Persister pure logic: statuses only move forward; ids of what it writes are derived."""

from __future__ import annotations

import uuid

import pytest

from services.persister import core


@pytest.mark.parametrize(
    ("earlier", "later"),
    [("unknown", "queued"), ("queued", "running")]
    + [("running", t) for t in ("completed", "refused", "clarified", "failed", "cancelled")],
)
def test_rank_orders_statuses_forward(earlier: str, later: str) -> None:
    assert core.rank(earlier) < core.rank(later)


@pytest.mark.parametrize(("kind", "status"), sorted(core.REPLY_STATUS.items()))
def test_every_reply_kind_ends_the_run_in_a_terminal_rank(kind: str, status: str) -> None:
    assert core.rank(status) == max(core.STATUS_RANK.values())


def test_assistant_message_id_is_deterministic_per_run() -> None:
    first = core.assistant_message_id("run-m1")
    assert first == core.assistant_message_id("run-m1") and isinstance(first, uuid.UUID)
    assert first != core.assistant_message_id("run-m2")


def test_persisted_event_id_names_the_run() -> None:
    assert core.persisted_event_id("run-m1") == "persisted:assistant:run-m1"
