"""``baton provision`` on a deployment whose streams came from an older version: a subject that
moved to a new stream (``agent.call.>``, from CHAT_STREAM to AGENT_CALLS) leaves the old stream
before the new one is made, so the new one is not refused for overlapping subjects. Real NATS."""

from __future__ import annotations

import nats
import nats.js.errors
import pytest

from baton.provision import provision
from shared import subjects
from tests.integration.conftest import Infra


async def test_provision_moves_the_agents_records_out_of_chat_stream(infra: Infra) -> None:
    nc = await nats.connect(infra.nats_url)
    try:
        js = nc.jetstream()
        # The streams as session 27's provision left them.
        await js.delete_stream(subjects.STREAM_AGENT_CALLS)
        old = (await js.stream_info(subjects.STREAM_TOKENS)).config
        old.subjects = [*(old.subjects or []), "agent.call.>"]
        await js.update_stream(old)
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.stream_info(subjects.STREAM_AGENT_CALLS)

        done = await provision(infra.nats_url)

        assert f"stream {subjects.STREAM_TOKENS} updated" in done
        assert f"stream {subjects.STREAM_AGENT_CALLS} created" in done
        # One line per stream, in the list's order, whatever order the answers came in.
        assert done[: len(subjects.STREAMS)] == [
            f"stream {s.name} {'created' if s.name == subjects.STREAM_AGENT_CALLS else 'updated'}"
            for s in subjects.STREAMS
        ]
        tokens = (await js.stream_info(subjects.STREAM_TOKENS)).config
        calls = (await js.stream_info(subjects.STREAM_AGENT_CALLS)).config
        assert "agent.call.>" not in (tokens.subjects or [])
        assert calls.subjects == ["agent.call.>"]
        ack = await js.publish("agent.call.abc", b"{}")
        assert ack.stream == subjects.STREAM_AGENT_CALLS
        # And again: nothing to move, nothing refused.
        again = await provision(infra.nats_url)
        assert again[: len(subjects.STREAMS)] == [
            f"stream {s.name} updated" for s in subjects.STREAMS
        ]
    finally:
        await nc.close()
