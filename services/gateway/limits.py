"""The HTTP edge's bounds: how big a request head may be, how long it may take, how many connections.

Pure bookkeeping (no sockets): ``server.HttpProtocol`` asks it and acts on the answers.
"""

from __future__ import annotations

import msgspec


class EdgeLimits(msgspec.Struct, frozen=True):
    """What one gateway process lets a client do before the application sees a request."""

    max_header_bytes: int = 16 * 1024  # request line and headers together
    max_headers: int = 100
    header_timeout_s: float = 10.0  # from connection (or first byte after keep-alive) to head end
    body_timeout_s: float = 30.0  # from head end to the last body byte
    max_connections: int = 4096
    max_connections_per_client: int = 256


# Why a connection is refused before its request is read: (status, code, message).
TOO_MANY_CONNECTIONS = (503, "too_many_connections", "the server has too many connections")
TOO_MANY_FROM_CLIENT = (429, "too_many_connections", "too many connections from this address")
HEAD_TOO_LARGE = (431, "headers_too_large", "request headers too large")
TOO_MANY_HEADERS = (431, "headers_too_large", "too many request headers")
HEAD_TIMEOUT = (408, "request_timeout", "request headers not received in time")
BODY_TIMEOUT = (408, "request_timeout", "request body not received in time")


class Connections:
    """Open connections, in total and per client address; a refused one is never counted."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self.by_client: dict[str, int] = {}

    def admit(self, client: str) -> tuple[int, str, str] | None:
        """Count one more connection from ``client``, or say why not (nothing is counted then)."""
        if self.total >= self.max_total:
            return TOO_MANY_CONNECTIONS
        held = self.by_client.get(client, 0)
        if held >= self.max_per_client:
            return TOO_MANY_FROM_CLIENT
        self.by_client[client] = held + 1
        self.total += 1
        return None

    def release(self, client: str) -> None:
        """One admitted connection of ``client`` has closed."""
        self.total -= 1
        held = self.by_client.get(client, 0) - 1
        if held > 0:
            self.by_client[client] = held
        else:
            # An address with nothing open costs nothing: many clients come and go.
            self.by_client.pop(client, None)


def refusal(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, in the API's error shape."""
    body = msgspec.json.encode({"error": {"status": status, "code": code, "message": message}})
    reason = _REASONS.get(status, b"Error")
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
            b"retry-after: 1\r\n" if status in (429, 503) else b"",
            b"\r\n",
            body,
        ]
    )


_REASONS = {
    408: b"Request Timeout",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}
