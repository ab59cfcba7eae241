"""`baton provision` against a cluster still starting: a 503 from JetStream is asked again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest

from baton.embedded import STARTUP_S, NatsCluster
from baton.provision import provision
from shared import subjects


async def _answers_503(url: str) -> bool:
    """A node whose cluster has no meta leader (for ~10 s after it started) says so with 503."""
    nc = await nats.connect(servers=[url], connect_timeout=2)
    try:
        await nc.jetstream().account_info()
    except nats.js.errors.ServiceUnavailableError:
        return True
    except nats.errors.TimeoutError:
        return False  # up too briefly to call itself leaderless: no answer yet
    finally:
        await nc.close()
    raise AssertionError("a lone node of three has no meta leader, yet JetStream answered")


async def _until_503(url: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while not await _answers_503(url):
        assert time.monotonic() < deadline, "the lone node never answered 503"


async def test_provision_waits_out_a_cluster_electing_its_leader(tmp_path: Path) -> None:
    # One node of three, as when the first pod of a StatefulSet is up and the others are not.
    cluster = NatsCluster(tmp_path / "cluster", size=3)
    try:
        cluster.nodes[0].start()
        await _until_503(cluster.nodes[0].url)
        # Without asking again, the first request fails at once.
        with pytest.raises(nats.js.errors.ServiceUnavailableError):
            await provision(cluster.nodes[0].url, replicas=3, unavailable_s=0)
        started = asyncio.create_task(provision(cluster.nodes[0].url, replicas=3))
        await asyncio.sleep(1)  # it cannot finish while the node is alone: it meets 503s
        assert not started.done()
        for node in cluster.nodes[1:]:
            await asyncio.to_thread(node.start)
        done = await asyncio.wait_for(started, STARTUP_S)
        assert f"stream {subjects.STREAMS[0].name} created" in done
        nc = await nats.connect(servers=cluster.urls)
        info = await nc.jetstream().stream_info(subjects.STREAMS[0].name)
        assert info.config.num_replicas == 3
        await nc.close()
    finally:
        cluster.stop()
