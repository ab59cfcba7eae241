"""``baton chat``: a terminal client that sends a message and prints the answer as it streams."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TextIO

import httpx

from shared import runs

RETRY_S = 0.5
GIVE_UP_S = 120.0


class ChatError(Exception):
    """The server refused the message (a 4xx), or did not answer in time."""


def endpoints(data_dir: Path) -> dict[str, Any]:
    """What ``baton up`` wrote for scripts: gateway URL and a dev token."""
    path = data_dir / "endpoints.json"
    if not path.exists():
        return {}
    result: dict[str, Any] = json.loads(path.read_text())
    return result


async def _events(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], last_id: str | None
) -> AsyncIterator[tuple[str, str, dict[str, Any]]]:
    """Server-sent events as (event, id, data); ends when the connection drops."""
    hdrs = {**headers, "Accept": "text/event-stream"}
    if last_id:
        hdrs["Last-Event-ID"] = last_id
    async with client.stream("GET", url, headers=hdrs, timeout=None) as resp:
        if resp.status_code != 200:
            raise ChatError(f"events: HTTP {resp.status_code}: {(await resp.aread()).decode()}")
        event, ident, data = "", "", ""
        async for line in resp.aiter_lines():
            if line.startswith(":"):
                yield "comment", "", {}
            elif not line:
                if event and data:
                    yield event, ident, json.loads(data)
                event, ident, data = "", "", ""
            else:
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "id":
                    ident = value
                elif field == "data":
                    data += value


# Control characters but newline and tab (C0, DEL, C1): what a tool's output or a model's text
# could use to drive the terminal (hide what follows, move the cursor over an approval prompt).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """``text`` as the terminal should show it: each control character written out (``\\x1b``)."""
    return _CONTROL.sub(lambda c: f"\\x{ord(c.group()):02x}", text)


def ask_line(prompt: str) -> bool:
    """A y/n question on stderr, its answer the next line of stdin (none: no)."""
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline()
    return line.strip().lower() in ("y", "yes")


class Chat:
    """One conversation: each message is posted once (with a key) and its answer streamed.

    A tool call the run waits on (``tool.requested``) is shown on stderr and answered with
    ``ask`` (a y/n question), or approved without asking when ``approve_all``.
    """

    def __init__(
        self,
        url: str,
        token: str,
        conversation: str | None,
        out: TextIO = sys.stdout,
        approve_all: bool = False,
        ask: Callable[[str], bool] = ask_line,
        notes: TextIO = sys.stderr,
    ) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.conversation = conversation or str(uuid.uuid4())
        self.out = out
        self.notes = notes
        self.approve_all = approve_all
        self.ask = ask
        self.last_id: str | None = None
        self.answered: set[str] = set()  # tool calls decided (a resume may replay a request)

    async def send(self, content: str) -> str:
        """Post ``content`` and print its answer as it streams; returns the final text."""
        async with httpx.AsyncClient(timeout=10) as client:
            connected = asyncio.Event()
            done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            run_id: list[str] = []
            reader = asyncio.create_task(self._read(client, connected, done, run_id))
            try:
                await asyncio.wait_for(connected.wait(), 15)
                message_id = await self._post(client, content)
                run_id.append(runs.run_id(message_id))
                return await asyncio.wait_for(asyncio.shield(done), GIVE_UP_S)
            finally:
                reader.cancel()

    async def _post(self, client: httpx.AsyncClient, content: str) -> str:
        # One key for every retry: a retried submit is the same message, never a second one.
        key = str(uuid.uuid4())
        body = {"conversation_id": self.conversation, "content": content}
        deadline = asyncio.get_running_loop().time() + GIVE_UP_S
        while True:
            try:
                r = await client.post(
                    f"{self.url}/api/chat",
                    json=body,
                    headers={**self.headers, "Idempotency-Key": key},
                )
                if r.status_code == 202:
                    return str(r.json()["message"]["id"])
                if r.status_code < 500:
                    raise ChatError(f"HTTP {r.status_code}: {r.json()['error']['message']}")
            except httpx.TransportError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise ChatError("the gateway did not accept the message in time")
            await asyncio.sleep(RETRY_S)

    async def _read(
        self,
        client: httpx.AsyncClient,
        connected: asyncio.Event,
        done: asyncio.Future[str],
        run_id: list[str],
    ) -> None:
        """Follow the conversation's events, resuming after a drop without a gap or repeat."""
        url = f"{self.url}/api/conversations/{self.conversation}/events"
        printed, attempt = "", 0
        while not done.done():
            try:
                async for event, ident, data in _events(client, url, self.headers, self.last_id):
                    connected.set()
                    if ident:
                        self.last_id = ident
                    mine = bool(run_id) and data.get("run_id") == run_id[0]
                    if not mine:
                        continue
                    if event in ("run.status", "token") and data.get("attempt", 0) > attempt:
                        # A new attempt: what was printed of the old one does not count.
                        if printed:
                            self.out.write("\n[the model is retrying]\n")
                            printed = ""
                        attempt = data["attempt"]
                    if event == "tool.requested":
                        await self._tool_call(client, data)
                        continue
                    if event == "tool.result":
                        self._note(f"[tool {data['tool']}: {data['outcome']}] {data['content']}")
                        continue
                    if event == "token" and data.get("attempt") == attempt:
                        printed += data["text"]
                        self.out.write(visible(data["text"]))
                        self.out.flush()
                    elif event in ("message.completed", "run.failed"):
                        text = data["content"]
                        # Tokens are best effort; the completion is the stored answer.
                        self.out.write(
                            visible(
                                text[len(printed) :] if text.startswith(printed) else f"\n{text}"
                            )
                        )
                        self.out.write("\n")
                        self.out.flush()
                        done.set_result(text)
                        return
            except (httpx.TransportError, json.JSONDecodeError):
                pass
            await asyncio.sleep(RETRY_S)

    def _note(self, line: str) -> None:
        self.notes.write(f"\n{visible(line)}\n")
        self.notes.flush()

    async def _tool_call(self, client: httpx.AsyncClient, call: dict[str, Any]) -> None:
        """Show a call waiting for the user, get its answer, and send it (once per call)."""
        call_id = str(call["tool_call_id"])
        if call_id in self.answered:
            return
        args = json.dumps(call["arguments"], ensure_ascii=False, sort_keys=True)
        self._note(f"[tool call] {call['tool']} ({call['server']}) {args}")
        if self.approve_all:
            approve = True
            self._note("[approved: --yes]")
        else:
            approve = await asyncio.to_thread(self.ask, "approve? [y/N] ")
        body = {
            "decisions": [
                {
                    "tool_call_id": call_id,
                    "approve": approve,
                    # Bound to what was shown: other arguments are refused (409), never run.
                    "input_digest": call["input_digest"],
                }
            ]
        }
        url = (
            f"{self.url}/api/conversations/{self.conversation}/runs/{call['run_id']}/tool-approvals"
        )
        deadline = asyncio.get_running_loop().time() + GIVE_UP_S
        while True:
            try:
                r = await client.post(url, json=body, headers=self.headers)
                if r.status_code == 202:
                    self.answered.add(call_id)
                    return
                if r.status_code < 500:
                    self.answered.add(call_id)
                    self._note(f"[not sent: {r.json()['error']['message']}]")
                    return
            except httpx.TransportError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise ChatError("the gateway did not take the tool decision in time")
            await asyncio.sleep(RETRY_S)


def main(args: Any) -> int:
    """Entry of ``baton chat`` (arguments parsed by baton.cli)."""
    info = endpoints(Path(args.data_dir))
    url = args.url or os.environ.get("BATON_URL") or info.get("gateway")
    token = args.token or os.environ.get("BATON_TOKEN") or info.get("token")
    if not url or not token:
        print("no gateway: run `baton up` first, or pass --url and --token", file=sys.stderr)
        return 2
    chat = Chat(url, token, args.conversation, approve_all=bool(getattr(args, "yes", False)))
    print(f"conversation {chat.conversation}", file=sys.stderr)
    lines = [" ".join(args.message)] if args.message else None
    try:
        if lines is not None:
            asyncio.run(chat.send(lines[0]))
            return 0
        for line in sys.stdin:
            if line.strip():
                asyncio.run(chat.send(line.strip()))
        return 0
    except (ChatError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
