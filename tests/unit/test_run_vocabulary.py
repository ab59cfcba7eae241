"""The run vocabulary lives in ``shared/runs.py`` alone: its ids round-trip, and no other module
spells a status set or a derived id by hand."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from shared import runs

ROOT = Path(__file__).resolve().parents[2]
# A derived id or the terminal set written out by hand, outside shared/runs.py.
SPELLED = re.compile(
    r"""f?["']run-|f["'](task|decision|verdict|deadline|abort|reply|persisted:assistant):"""
    r"""|frozenset\(\{\s*["']completed["']"""
)


def test_a_run_id_names_its_message_and_back() -> None:
    message_id = str(uuid.uuid4())
    assert runs.message_of(runs.run_id(message_id)) == message_id
    assert runs.is_run_id(runs.run_id(message_id))


@pytest.mark.parametrize(
    "bad", ["run-", "run-xyz", "Run-00000000-0000-0000-0000-000000000001", "task:run-1:1", ""]
)
def test_a_malformed_run_id_names_no_message(bad: str) -> None:
    assert runs.message_of(bad) is None


def test_every_status_has_a_rank_and_every_terminal_one_the_last() -> None:
    assert set(runs.STATUS_RANK) == set(runs.STATUSES)
    assert set(runs.STATUSES) > runs.TERMINAL
    assert {runs.rank(s) for s in runs.TERMINAL} == {max(runs.STATUS_RANK.values())}
    assert set(runs.REPLY_STATUS.values()) <= runs.TERMINAL


def test_no_other_module_spells_the_run_vocabulary() -> None:
    found = []
    for tree in ("shared", "services", "baton"):
        for path in sorted((ROOT / tree).rglob("*.py")):
            if path == ROOT / "shared" / "runs.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if SPELLED.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []
