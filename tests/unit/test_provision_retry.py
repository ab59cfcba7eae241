"""`baton provision` asks a request again while JetStream answers 503 or does not answer in
time (every request it makes is idempotent), up to its bound; any other error at once."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest

from baton.provision import _while_unavailable


class Flaky:
    """A request that fails ``n`` times with ``error``, then answers."""

    def __init__(self, n: int, error: Exception) -> None:
        self.n, self.error, self.calls = n, error, 0

    async def __call__(self, name: str) -> str:
        self.calls += 1
        if self.calls <= self.n:
            raise self.error
        return f"{name} ready"


@pytest.mark.parametrize(
    "error", [nats.errors.TimeoutError(), nats.js.errors.ServiceUnavailableError()]
)
async def test_a_request_timed_out_or_unavailable_is_asked_again(error: Exception) -> None:
    flaky = Flaky(2, error)
    assert await _while_unavailable(30, flaky, "stream A") == "stream A ready"
    assert flaky.calls == 3


async def test_a_request_still_timing_out_at_the_bound_raises_the_last_error() -> None:
    flaky = Flaky(100, nats.errors.TimeoutError())
    with pytest.raises(nats.errors.TimeoutError):
        await _while_unavailable(0, flaky, "stream A")
    assert flaky.calls == 1


async def test_any_other_error_is_not_asked_again() -> None:
    flaky = Flaky(1, nats.js.errors.BadRequestError())
    with pytest.raises(nats.js.errors.BadRequestError):
        await _while_unavailable(30, flaky, "stream A")
    assert flaky.calls == 1
