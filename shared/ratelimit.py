"""Fixed-window message counters shared by policy (writes them) and the gateway (reads them)."""

from __future__ import annotations

import msgspec

from shared import subjects

WINDOWS: dict[str, int] = {"m": 60, "h": 3600}


class RateWindow(msgspec.Struct, kw_only=True):
    """The messages one user sent in one fixed window; ids make counting a redelivery a no-op."""

    start: int
    length: int
    limit: int
    ids: list[str] = msgspec.field(default_factory=list)

    @property
    def full(self) -> bool:
        return len(self.ids) >= self.limit

    def retry_after(self, now: float) -> int:
        """Whole seconds until the window ends (at least 1)."""
        return max(1, int(self.start + self.length - now + 0.999))


def window_start(now: float, length: int) -> int:
    """Windows are aligned to the epoch (so every replica agrees on them): UTC minutes/hours."""
    return int(now) // length * length


def key(window: str, now: float, project: str, user: str) -> str:
    return subjects.rate_key(window, window_start(now, WINDOWS[window]), project, user)


decoder = msgspec.json.Decoder(RateWindow)
