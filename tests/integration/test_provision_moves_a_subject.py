"""``baton provision`` on a deployment whose streams came from an older version: a subject that
moved to a new stream (``agent.call.>``, from CHAT_STREAM to AGENT_CALLS) leaves the old stream
before the new one is made, so the new one is not refused for overlapping subjects. A real
nats-server of the test's own (the test rewrites streams: never a shared one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nats
import nats.js.errors
import pytest

from baton import provision as provisioning
from baton.embedded import NatsServer
from shared import subjects


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[str]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server.url
    finally:
        server.kill()


# The list's order, and the new stream first: with every stream asked for at once (the code
# before), the create of AGENT_CALLS then reaches the server before CHAT_STREAM gives the
# subject up, and is refused.
@pytest.mark.parametrize("order", ["as listed", "new stream first"])
async def test_provision_moves_the_agents_records_out_of_chat_stream(
    own_nats: str, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await provisioning.provision(own_nats)
    streams = list(subjects.STREAMS)
    if order == "new stream first":
        streams.sort(key=lambda s: s.name != subjects.STREAM_AGENT_CALLS)
    monkeypatch.setattr(subjects, "STREAMS", tuple(streams))
    nc = await nats.connect(own_nats)
    try:
        js = nc.jetstream()
        # The streams as session 27's provision left them.
        await js.delete_stream(subjects.STREAM_AGENT_CALLS)
        old = (await js.stream_info(subjects.STREAM_TOKENS)).config
        old.subjects = [*(old.subjects or []), "agent.call.>"]
        await js.update_stream(old)
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.stream_info(subjects.STREAM_AGENT_CALLS)

        done = await provisioning.provision(own_nats)

        # One line per stream, in the list's order, whatever order the answers came in.
        assert done[: len(streams)] == [
            f"stream {s.name} {'created' if s.name == subjects.STREAM_AGENT_CALLS else 'updated'}"
            for s in streams
        ]
        tokens = (await js.stream_info(subjects.STREAM_TOKENS)).config
        calls = (await js.stream_info(subjects.STREAM_AGENT_CALLS)).config
        assert "agent.call.>" not in (tokens.subjects or [])
        assert calls.subjects == ["agent.call.>"]
        ack = await js.publish("agent.call.abc", b"{}")
        assert ack.stream == subjects.STREAM_AGENT_CALLS
        # And again: nothing to move, nothing refused.
        again = await provisioning.provision(own_nats)
        assert again[: len(streams)] == [f"stream {s.name} updated" for s in streams]
    finally:
        await nc.close()
