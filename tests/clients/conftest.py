"""Client-library tests against the five services: one stack per module (tests/browser's)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from baton.embedded import PostgresServer
from tests.conftest import ExternalPostgres
from tests.e2e.conftest import Pipeline, fresh, module_stack


@pytest.fixture(scope="module")
def _clients_stack(
    postgres_server: PostgresServer | ExternalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    yield from module_stack(postgres_server, tmp_path_factory.mktemp("clients"))


@pytest.fixture
def pipeline(_clients_stack: Pipeline) -> Pipeline:
    return fresh(_clients_stack)
