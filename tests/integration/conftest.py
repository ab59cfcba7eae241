"""Integration fixtures: a provisioned NATS, a migrated database and the offline model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import msgspec
import pytest

from baton.migrate import migrate
from baton.offline_model import ModelSettings, OfflineModelProcess
from baton.provision import provision


class Infra(msgspec.Struct, frozen=True):
    nats_url: str
    database_url: str


@pytest.fixture
def infra(nats_url: str, database_url: str) -> Infra:
    asyncio.run(provision(nats_url))
    asyncio.run(migrate(database_url))
    return Infra(nats_url, database_url)


@pytest.fixture(scope="session")
def model_process() -> Iterator[OfflineModelProcess]:
    with OfflineModelProcess(ModelSettings(style="hostile")) as proc:
        yield proc


@pytest.fixture
def offline_model(model_process: OfflineModelProcess) -> OfflineModelProcess:
    """The session's model, with counters and faults reset for this test."""
    model_process.clear()
    return model_process
