"""The wiring table against its copies: service READMEs, handlers, grants and provisioning."""

from __future__ import annotations

import importlib
import re
import typing
from pathlib import Path

import pytest

from baton import permissions
from shared import wiring

ROOT = Path(__file__).resolve().parents[2]
SERVICES = tuple(wiring.WIRING)
# A README names a subject's variable tokens as ``<p>``, ``<project>``, ...; the table as ``*``.
PLACEHOLDER = re.compile(r"<[^>]+>")
DURABLE = re.compile(r"^[a-z]+(-[a-z]+)*$")


def readme_row(service: str, row: str) -> list[str]:
    """The backticked words of one row (``| consumes | … |``) of the service's README table."""
    text = (ROOT / "services" / service / "README.md").read_text()
    match = re.search(rf"^\| {row} \|(.*)\|\s*$", text, re.M)
    assert match, f"services/{service}/README.md has no '| {row} |' row"
    return re.findall(r"`([^`]+)`", match.group(1))


def subjects_of(words: list[str]) -> set[str]:
    # Ids such as ``task:<run>:<attempt>`` have colons; subjects have dots and none.
    return {PLACEHOLDER.sub("*", w) for w in words if "." in w and ":" not in w}


@pytest.mark.parametrize("service", SERVICES)
def test_the_readme_names_the_subjects_the_service_consumes(service: str) -> None:
    w = wiring.WIRING[service]
    expected = {c.filter_subject for c in w.consumers} | set(w.listens)
    assert subjects_of(readme_row(service, "consumes")) == expected


@pytest.mark.parametrize("service", SERVICES)
def test_the_readme_names_the_durables_the_service_binds(service: str) -> None:
    words = readme_row(service, "consumes")
    assert {x for x in words if DURABLE.fullmatch(x)} == {
        c.durable for c in wiring.WIRING[service].consumers
    }


@pytest.mark.parametrize("service", SERVICES)
def test_the_readme_names_the_subjects_the_service_publishes(service: str) -> None:
    assert subjects_of(readme_row(service, "publishes")) == set(wiring.WIRING[service].publishes)


@pytest.mark.parametrize("service", SERVICES)
def test_the_readme_names_the_buckets_the_service_uses(service: str) -> None:
    w = wiring.WIRING[service]
    text = (ROOT / "services" / service / "README.md").read_text()
    for bucket in (*w.buckets, *w.reads_buckets):
        assert f"`{bucket}`" in text


@pytest.mark.parametrize(
    ("service", "entry"),
    [(s, c) for s in SERVICES for c in wiring.WIRING[s].consumes],
    ids=lambda x: x if isinstance(x, str) else x.spec.durable,
)
def test_each_consumer_names_a_handler_that_takes_its_schema(
    service: str, entry: wiring.Consumes
) -> None:
    handlers = importlib.import_module(f"services.{service}.handlers").Handlers
    # The handler, and the hook for a delivery past the bound if the entry names one: a hook
    # that took the wrong type would fail at run time, be logged, and bill nothing.
    for name in (entry.handler, entry.exhausted):
        if name is None:
            continue
        method = getattr(handlers, name)
        first = next(iter(typing.get_type_hints(method).values()))
        assert first is entry.schema, name


def test_every_durable_is_declared_once() -> None:
    durables = [c.durable for c in wiring.CONSUMERS]
    assert len(durables) == len(set(durables))


@pytest.mark.parametrize("service", SERVICES)
def test_the_grants_are_the_wiring(service: str) -> None:
    w, grant = wiring.WIRING[service], permissions.GRANTS[service]
    assert grant.consumers == w.consumers and grant.publishes == w.publishes
    assert grant.listens == w.listens
