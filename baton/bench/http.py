"""A minimal HTTP/1.1 keep-alive client and SSE reader on raw asyncio streams (cheap per request)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit


class HttpError(Exception):
    """The server answered with something this client cannot read."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 to 100) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max of durations in seconds, as milliseconds rounded to 0.01."""
    return {f"p{q}_ms": round(percentile(seconds, q) * 1000, 2) for q in (50, 95, 99)} | {
        "max_ms": round(max(seconds, default=0.0) * 1000, 2)
    }


class Connection:
    """One keep-alive connection; requests on it are sequential."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = self.reader = None

    def head(self, method: str, path: str, headers: dict[str, str], length: int) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes]:
        """Send one request and read the whole response (Content-Length bodies only).

        A kept-alive connection the server closed while idle is reopened once.
        """
        reused = self.writer is not None
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.head(method, path, headers, len(body)) + body)
        try:
            status, resp_headers = await read_head(self.reader)
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise
            await self.close()
            return await self.request(method, path, headers, body)
        length = int(resp_headers.get("content-length", "0"))
        data = await self.reader.readexactly(length) if length else b""
        if resp_headers.get("connection", "").lower() == "close":
            await self.close()
        return status, data


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError) as exc:
        raise HttpError(f"bad status line {lines[0]!r}") from exc
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


class SseStream:
    """One Server-Sent Events stream: ``open()`` returns once the server answered 200."""

    def __init__(self, url: str, path: str, headers: dict[str, str]) -> None:
        self.conn = Connection(url)
        self.path = path
        self.headers = {**headers, "Accept": "text/event-stream"}
        self.chunked = False

    async def open(self) -> None:
        await self.conn.open()
        assert self.conn.reader is not None and self.conn.writer is not None
        self.conn.writer.write(self.conn.head("GET", self.path, self.headers, 0))
        status, headers = await read_head(self.conn.reader)
        if status != 200:
            await self.conn.close()
            raise HttpError(f"SSE {self.path} answered {status}")
        self.chunked = headers.get("transfer-encoding", "").lower() == "chunked"

    async def close(self) -> None:
        await self.conn.close()

    async def events(self) -> AsyncIterator[tuple[str, str]]:
        """(event, data) pairs until the server ends the stream; comments are skipped."""
        reader = self.conn.reader
        assert reader is not None
        buffer = b""
        while True:
            if self.chunked:
                size = int((await reader.readuntil(b"\r\n")).strip() or b"0", 16)
                if size == 0:
                    return
                buffer += (await reader.readexactly(size + 2))[:-2]
            else:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buffer += chunk
            buffer = buffer.replace(b"\r\n", b"\n")
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                event, data = "message", []
                for line in frame.decode().split("\n"):
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip())
                if data:
                    yield event, "\n".join(data)
