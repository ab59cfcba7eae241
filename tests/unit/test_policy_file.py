"""The policy file: the example parses; every kind of bad file is refused naming key or line."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from services.policy import policyfile
from services.policy.policyfile import PolicyFileError, parse

ROOT = Path(__file__).resolve().parents[2]

GOOD = b"""
[defaults]
max_concurrent_runs = 5
[defaults.caps]
project_daily_tokens = 1000
user_daily_tokens = 100
[defaults.rate]
per_minute = 3
[projects.acme]
double_texting = "interrupt"
retry_backoff_s = [0.5, 2.0, 8.0]
fallback_model = "claude-haiku-4-5"
[projects.acme.caps]
user_daily_tokens = 500
"""


def test_the_shipped_example_parses_and_overrides_merge_onto_the_defaults() -> None:
    book = policyfile.load(ROOT / "policy.example.toml")
    acme, other = book.rules_for("acme"), book.rules_for("someone-else")
    assert acme.limits.max_concurrent_runs == 200 and other.limits.max_concurrent_runs == 50
    # Nested tables merge key by key: acme's own token cap, the default per-user caps.
    assert acme.limits.project_daily_tokens == 50_000_000
    assert acme.limits.user_daily_tokens == other.limits.user_daily_tokens == 500_000
    assert acme.limits.user_messages_per_minute == 60
    assert acme.limits.user_messages_per_hour == 300
    assert "creative" in acme.disallowed_intents
    trial = book.rules_for("trial")
    assert set(trial.models) == {"claude-haiku-4-5"} and trial.double_texting == "reject"
    assert other.downgrade_model == "claude-haiku-4-5" and other.downgrade_at == 0.8


def test_lifecycle_fields_map_from_the_file_with_the_agreed_defaults() -> None:
    book = parse(GOOD)
    acme, other = book.rules_for("acme"), book.rules_for("x")
    assert acme.double_texting == "interrupt" and other.double_texting == "enqueue"
    assert acme.retry_backoff_s == (0.5, 2.0, 8.0) and other.retry_backoff_s == (1.0, 4.0)
    assert acme.fallback_model == "claude-haiku-4-5" and other.fallback_model is None
    assert acme.limits.user_daily_tokens == 500 and acme.limits.project_daily_tokens == 1000


def test_an_empty_file_means_the_built_in_defaults() -> None:
    rules = parse(b"").rules_for("any")
    assert rules.default_model == "claude-sonnet-4-6" and rules.limits.max_concurrent_runs is None
    assert set(rules.models) == {"claude-sonnet-4-6", "claude-haiku-4-5"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # syntax: the line is in the message
        ("[defaults\nmax_attempts = 3", "line 1"),
        ("[defaults]\nmax_attempts = = 3", "line 2"),
        # wrong types
        ('[defaults]\nmax_attempts = "3"', "'defaults.max_attempts' (line 2)"),
        ("[defaults.caps]\nproject_daily_tokens = 1.5", "'defaults.caps.project_daily_tokens'"),
        ('[defaults]\nallowed_executors = "chat"', "allowed_executors"),
        ("[defaults]\nclarify_ambiguous = 1", "clarify_ambiguous"),
        # unknown keys, anywhere
        ("[defaults]\nmax_attempt = 3", "max_attempt"),
        ("[defaults.caps]\nproject_tokens = 3", "project_tokens"),
        ("[project.acme]\nmax_attempts = 3", "project"),
        ("[projects.acme]\nbudget = 3", "budget"),
        ('[tiers.x]\nmodel = "m"\ninput = 1\noutput = 1\ncolour = "red"', "colour"),
        # negative caps and prices, zero or negative rates
        ("[defaults.caps]\nuser_daily_tokens = -1", "'defaults.caps.user_daily_tokens' (line 2)"),
        ("[projects.a.caps]\nproject_daily_cost_usd = -0.5", "project_daily_cost_usd"),
        ("[defaults.rate]\nper_minute = 0", "per_minute"),
        ('[tiers.x]\nmodel = "m"\ninput = -1\noutput = 1', "input"),
        # unknown models and tiers
        ('[defaults]\ndefault_model = "gpt-9"', "default_model"),
        ('[defaults]\nallowed_models = ["gpt-9"]', "not in any [tiers.*]"),
        ('[defaults]\nfallback_model = "gpt-9"', "fallback_model"),
        ('[defaults.downgrade]\nat_fraction = 0.8\nto_tier = "cheap"', "no tier 'cheap'"),
        ('[projects.p]\nallowed_models = ["claude-haiku-4-5"]', "default_model"),
        # bad enums and cross references
        ('[defaults]\ndouble_texting = "ignore"', "double_texting"),
        ('[defaults]\nallowed_executors = ["chat"]\ndefault_executor = "code"', "default_executor"),
        ('[defaults]\ndisallowed_intents = ["murder"]', "disallowed_intents"),
        ("[defaults]\nallowed_executors = []", "allowed_executors"),
        # oversized and hostile values
        ("[defaults.caps]\nproject_daily_tokens = 99999999999999999999", "project_daily_tokens"),
        ("[defaults.caps]\nproject_daily_cost_usd = inf", "project_daily_cost_usd"),
        ("[defaults.caps]\nproject_daily_cost_usd = nan", "project_daily_cost_usd"),
        ("[defaults]\nretry_backoff_s = [" + "1.0, " * 11 + "1.0]", "retry_backoff_s"),
        ("[defaults]\nmax_output_tokens = 1000000000", "max_output_tokens"),
        ("[defaults.downgrade]\nat_fraction = 1.5\nto_tier = 'economy'", "at_fraction"),
        ('[projects."a.b"]\nmax_attempts = 2', "projects"),
        ('[projects."$(rm -rf /)"]\nmax_attempts = 2', "projects"),
        ('[tiers.x]\nmodel = "a b"\ninput = 1\noutput = 1', "model"),
    ],
)
def test_a_bad_file_is_refused_with_the_key_or_line(text: str, expected: str) -> None:
    with pytest.raises(PolicyFileError) as err:
        parse(text.encode(), "p.toml")
    assert str(err.value).startswith("p.toml: ")
    assert expected in str(err.value)


def test_an_oversized_or_binary_or_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="more than"):
        parse(b"#" * (policyfile.MAX_FILE_BYTES + 1))
    with pytest.raises(PolicyFileError, match="not UTF-8"):
        parse(b"\xff\xfe[defaults]")
    with pytest.raises(PolicyFileError, match="cannot read"):
        policyfile.load(tmp_path / "nope.toml")
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (policyfile.MAX_FILE_BYTES + 1))
    with pytest.raises(PolicyFileError, match="more than"):
        policyfile.load(big)


def test_deeply_nested_hostile_toml_is_refused_not_crashing() -> None:
    with pytest.raises(PolicyFileError):
        parse(b"[defaults]\nallowed_models = " + b"[" * 5000 + b"]" * 5000)


def test_a_changed_file_is_picked_up_and_a_bad_change_keeps_the_previous_rules(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(GOOD)
    book = policyfile.load(path)
    seen: list[policyfile.Book] = []
    errors: list[PolicyFileError] = []
    watcher = policyfile.Watcher(path, book, seen.append, errors.append, interval_s=0.01)
    assert watcher.check() is False  # unchanged

    def write(data: bytes, stamp: int) -> None:
        path.write_bytes(data)
        os.utime(path, ns=(stamp, stamp))  # mtime moves even within one clock tick

    write(GOOD.replace(b"max_concurrent_runs = 5", b"max_concurrent_runs = 7"), 10**18)
    assert watcher.check() is True
    assert seen[-1].rules_for("x").limits.max_concurrent_runs == 7
    write(b"[defaults]\nmax_concurrent_runs = -7", 2 * 10**18)
    assert watcher.check() is False
    assert len(seen) == 1 and "max_concurrent_runs" in str(errors[-1])
    # The run loop polls until stopped.
    write(GOOD, 3 * 10**18)

    async def poll() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.run(stop))
        for _ in range(200):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(poll())
    assert seen[-1].rules_for("x").limits.max_concurrent_runs == 5


def test_a_configmap_update_swapped_in_by_the_kubelet_is_picked_up(tmp_path: Path) -> None:
    """The kubelet's layout for a ConfigMap volume (k8s/base/policy-rules.yaml): policy.toml is a
    link to ..data/policy.toml, ..data a link to a timestamped directory; an update writes a new
    directory and renames a new ..data link over the old one, then removes the old directory."""
    mount = tmp_path / "policy"
    mount.mkdir()

    def publish(version: str, data: bytes, stamp: int) -> None:
        target = mount / f"..{version}"
        target.mkdir()
        (target / "policy.toml").write_bytes(data)
        os.utime(target / "policy.toml", ns=(stamp, stamp))
        old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
        (mount / "..data_tmp").symlink_to(target.name)
        os.replace(mount / "..data_tmp", mount / "..data")
        if old is not None:
            shutil.rmtree(mount / old)

    publish("2026_01_01_00_00_00.1", GOOD, 10**18)
    (mount / "policy.toml").symlink_to("..data/policy.toml")
    path = mount / "policy.toml"
    seen: list[policyfile.Book] = []
    errors: list[PolicyFileError] = []
    watcher = policyfile.Watcher(path, policyfile.load(path), seen.append, errors.append)
    assert watcher.check() is False
    changed = GOOD.replace(b"max_concurrent_runs = 5", b"max_concurrent_runs = 9")
    publish("2026_01_01_00_01_00.2", changed, 2 * 10**18)
    assert watcher.check() is True and not errors
    assert seen[-1].rules_for("x").limits.max_concurrent_runs == 9
