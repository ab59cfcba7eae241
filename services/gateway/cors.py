"""Cross-origin rules: which browser origins may call the API, and what a preflight answers.

Pure decisions (no ASGI): ``front.Front`` asks them for every request that carries an ``Origin``.
Origins are listed exactly; ``*`` and patterns are refused at startup, so nothing opens by
accident and no suffix trick (``https://app.example.com.evil.test``) ever matches.
"""

from __future__ import annotations

import re

import msgspec

from shared.errors import ConfigError

# What a browser script may read of a response besides the CORS-safelisted headers.
EXPOSED = (
    "Idempotent-Replayed",
    "Retry-After",
    "RateLimit",
    "RateLimit-Policy",
    "X-Request-ID",
)
_ORIGIN = re.compile(
    r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?"
)


class Policy(msgspec.Struct, frozen=True):
    """The allowed origins, methods and request headers (lower-cased where case does not count)."""

    origins: frozenset[str] = frozenset()
    methods: frozenset[str] = frozenset()
    headers: frozenset[str] = frozenset()
    max_age_s: int = 600

    def allows(self, origin: str) -> bool:
        return origin in self.origins

    def preflight(self, origin: str, method: str, requested: str) -> str | None:
        """None if a preflight may pass, else the reason it is refused."""
        if not self.allows(origin):
            return "origin not allowed"
        if method.upper() not in self.methods:
            return f"method {method} not allowed"
        for name in (h.strip().lower() for h in requested.split(",")):
            if name and name not in self.headers:
                return f"header {name} not allowed"
        return None

    def preflight_headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"access-control-allow-methods", ", ".join(sorted(self.methods)).encode()),
            (b"access-control-allow-headers", ", ".join(sorted(self.headers)).encode()),
            (b"access-control-max-age", str(self.max_age_s).encode()),
        ]


def policy(origins: str, methods: str, headers: str, max_age_s: int = 600) -> Policy:
    """A policy from comma-separated settings; ConfigError for a wildcard or a malformed origin."""
    allowed = [o.strip() for o in origins.split(",") if o.strip()]
    for origin in allowed:
        if "*" in origin:
            raise ConfigError(
                f"GATEWAY_CORS_ORIGINS: {origin!r}: wildcards are not allowed; list each origin"
            )
        if _ORIGIN.fullmatch(origin) is None:
            raise ConfigError(
                f"GATEWAY_CORS_ORIGINS: {origin!r} is not an origin (scheme://host[:port], no path)"
            )
    return Policy(
        origins=frozenset(allowed),
        methods=frozenset(m.strip().upper() for m in methods.split(",") if m.strip()),
        headers=frozenset(h.strip().lower() for h in headers.split(",") if h.strip()),
        max_age_s=max_age_s,
    )
