"""Operator tooling for the dead-letter stream: list, show and replay dead letters."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors

from shared import estimate, messages, subjects
from shared.config import nats_servers
from shared.errors import ConfigError

# JetStream API error codes (nats-server's errors.json) that mean something to an operator.
_NO_MESSAGE = 10037
_SEQUENCE_NOT_FOUND = 10043
_STREAM_NOT_FOUND = 10059

REASON_WIDTH = 80

_decoder = msgspec.json.Decoder(messages.DeadLetter)


class DlqError(Exception):
    """Something an operator must hear about; nothing was changed unless the message says so."""


class UnknownLetter(DlqError):
    """No dead letter with this id (never stored, aged out, or already replayed)."""

    def __init__(self, letter_id: int) -> None:
        super().__init__(
            f"no dead letter with id {letter_id} in {subjects.STREAM_DLQ} "
            "(already replayed, aged out, or never there)"
        )
        self.letter_id = letter_id


class LetterInfo(msgspec.Struct, kw_only=True, frozen=True):
    """One dead letter as a listing shows it; ``id`` is its sequence in DEAD_LETTERS."""

    id: int
    consumer: str
    stream: str
    subject: str
    stream_seq: int
    deliveries: int
    reason: str
    failed_at: datetime
    size: int  # bytes of the original payload


class Letter(LetterInfo, kw_only=True, frozen=True):
    """A dead letter in full: the original headers and payload as they were refused."""

    headers: dict[str, str]
    payload: bytes

    def preview(self, limit: int = 2000) -> str:
        return printable(self.payload, limit)


class ReplayResult(msgspec.Struct, kw_only=True, frozen=True):
    """Where a replay went: the stream and sequence JetStream stored it at, and under which id."""

    letter_id: int
    subject: str
    msg_id: str
    stream: str
    seq: int
    duplicate: bool  # JetStream already had this id: an earlier replay of the same letter


def printable(payload: bytes, limit: int = 2000) -> str:
    """The payload as one line of text: UTF-8 where it decodes, escapes for everything else."""
    text = payload.decode("utf-8", errors="backslashreplace")
    # Control characters (newlines, ESC) would break tables and could drive the terminal.
    safe = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    if len(safe) > limit:
        return f"{safe[:limit]}… ({len(payload)} bytes)"
    return safe


@contextlib.asynccontextmanager
async def _jetstream(nats_url: str, user: str, password: str) -> AsyncIterator[Any]:
    async def quiet(_exc: Exception) -> None:
        # nats-py prints every failed attempt with a traceback; the raised error says enough.
        return None

    try:
        servers = nats_servers(nats_url)
    except ConfigError as exc:
        raise DlqError(str(exc)) from exc
    options: dict[str, Any] = {
        "servers": servers,
        "name": "baton-dlq",
        "connect_timeout": 3,
        # A one-shot command must fail fast rather than retry forever (nats-py only gives up
        # when max_reconnect_attempts is positive, even with allow_reconnect off).
        "allow_reconnect": False,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.2,
        "error_cb": quiet,
    }
    if user:
        options.update(user=user, password=password)
    try:
        nc = await nats.connect(**options)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise DlqError(f"could not connect to NATS at {nats_url}: {exc}") from exc
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


def _not_found(exc: nats.js.errors.NotFoundError, letter_id: int) -> DlqError:
    if exc.err_code == _STREAM_NOT_FOUND:
        return DlqError(f"stream {subjects.STREAM_DLQ} does not exist: run `baton provision`")
    return UnknownLetter(letter_id)


async def _get(js: Any, letter_id: int) -> Any:
    if letter_id < 1:
        raise UnknownLetter(letter_id)
    try:
        # The non-direct get is answered by the stream leader, so it agrees with delete_msg;
        # a direct get may be served by a replica that has not seen a delete yet.
        return await js.get_msg(subjects.STREAM_DLQ, seq=letter_id)
    except nats.js.errors.NotFoundError as exc:
        raise _not_found(exc, letter_id) from exc


def _letter(raw: Any) -> Letter:
    data: bytes = raw.data or b""
    try:
        d = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # Anyone allowed to publish on dlq.> could have put this here: list it, don't crash.
        tokens = (raw.subject or "").split(".")
        return Letter(
            id=raw.seq,
            stream=tokens[1] if len(tokens) > 1 else "",
            consumer=tokens[2] if len(tokens) > 2 else "",
            subject="",
            stream_seq=0,
            deliveries=0,
            reason=f"unreadable dead letter: {exc}",
            failed_at=raw.time or datetime.now(UTC),
            size=len(data),
            headers={},
            payload=data,
        )
    return Letter(
        id=raw.seq,
        stream=d.stream,
        consumer=d.consumer,
        subject=d.subject,
        stream_seq=d.stream_seq,
        deliveries=d.deliveries,
        reason=d.reason,
        failed_at=d.failed_at,
        size=len(d.payload),
        headers=d.headers,
        payload=d.payload,
    )


def _info(letter: Letter) -> LetterInfo:
    return LetterInfo(**{f: getattr(letter, f) for f in LetterInfo.__struct_fields__})


async def list_letters(
    nats_url: str,
    limit: int = 100,
    consumer: str | None = None,
    *,
    user: str = "",
    password: str = "",
) -> list[LetterInfo]:
    """The oldest ``limit`` dead letters (of one consumer, on any stream, if given), oldest first.

    Reads by sequence with "next message on this subject" gets: no consumer is created, so
    listing changes nothing on the server and leaves nothing behind.
    """
    if consumer is not None and not subjects.is_safe_token(consumer):
        raise DlqError(f"not a consumer name: {consumer!r}")
    # Stream and consumer names are single tokens, so dlq.*.* is every dead letter.
    wanted = subjects.dead_letter("*", consumer or "*")
    found: list[LetterInfo] = []
    async with _jetstream(nats_url, user, password) as js:
        seq = 1
        while len(found) < limit:
            try:
                raw = await js.get_msg(subjects.STREAM_DLQ, seq=seq, subject=wanted, next=True)
            except nats.js.errors.NotFoundError as exc:
                if exc.err_code == _STREAM_NOT_FOUND:
                    raise _not_found(exc, seq) from exc
                break  # no further letter on that subject
            found.append(_info(_letter(raw)))
            seq = raw.seq + 1
    return found


async def show(nats_url: str, letter_id: int, *, user: str = "", password: str = "") -> Letter:
    """One dead letter in full; ``UnknownLetter`` when there is none with that id."""
    async with _jetstream(nats_url, user, password) as js:
        return _letter(await _get(js, letter_id))


async def replay(
    nats_url: str, letter_id: int, *, user: str = "", password: str = ""
) -> ReplayResult:
    """Republish a dead letter's original payload and headers to its original subject, then
    delete the letter.

    The copy carries ``Nats-Msg-Id = replay:<stream>:<stream_seq>:<letter_id>``: unlike the
    original id it is new to JetStream's dedup, so it is stored; a second replay of the same
    letter within the dedup window (e.g. after a crash between publish and delete, or two
    operators at once) is dropped as a duplicate. After the window, or when the letter is
    already gone, a second replay is refused with ``UnknownLetter``.

    The copy goes to the subject, so *every* consumer of that stream whose filter matches sees
    it again, not only the one that dead-lettered it. That is safe because every handler is
    idempotent downstream: database unique keys (message id, run id, call id) and ids derived
    from the input make handling an already-handled message a no-op. Replay only helps once
    the cause is fixed (code deployed, data corrected); otherwise the copy is dead-lettered
    again as a new letter. A letter whose republish fails is kept.
    """
    async with _jetstream(nats_url, user, password) as js:
        raw = await _get(js, letter_id)
        try:
            letter = _decoder.decode(raw.data or b"")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DlqError(
                f"dead letter {letter_id} is unreadable ({exc}): nothing to replay"
            ) from exc
        msg_id = f"replay:{letter.stream}:{letter.stream_seq}:{letter_id}"
        headers = {
            k: v
            for k, v in letter.headers.items()
            # The original id would be dropped by dedup; expectations (last sequence etc.)
            # described the stream at the original publish and would now refuse the copy.
            if k.lower() != "nats-msg-id" and not k.lower().startswith("nats-expected-")
        }
        headers["Nats-Msg-Id"] = msg_id
        # The copy's deliveries count from 1 again: its calls' ids count on from this letter's
        # (estimate.delivery), so no call of the copy takes the id of one of the letter's.
        base = estimate.delivery_base(letter.headers) + letter.deliveries
        if base > estimate.MAX_DELIVERY_BASE:
            # Counted on any further, its calls' ids would no longer be told apart from its
            # earlier lives': a message replayed this often needs a person, not another replay.
            raise DlqError(
                f"dead letter {letter_id} was delivered {base} times in all its lives "
                f"(more than {estimate.MAX_DELIVERY_BASE}): not replayed, letter kept"
            )
        headers = {
            k: v for k, v in headers.items() if k.lower() != estimate.DELIVERY_BASE_HEADER.lower()
        }
        headers[estimate.DELIVERY_BASE_HEADER] = str(base)
        try:
            ack = await js.publish(letter.subject, letter.payload, headers=headers, timeout=5.0)
        except nats.js.errors.NoStreamResponseError as exc:
            raise DlqError(
                f"no stream stores {letter.subject} any more: letter {letter_id} kept"
            ) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise DlqError(f"republish failed ({exc}): letter {letter_id} kept") from exc
        try:
            await js.delete_msg(subjects.STREAM_DLQ, letter_id)
        except (nats.js.errors.NotFoundError, nats.js.errors.BadRequestError) as exc:
            # A concurrent replay deleted it first; the copy was deduplicated either way.
            if exc.err_code not in (_NO_MESSAGE, _SEQUENCE_NOT_FOUND):
                raise
        return ReplayResult(
            letter_id=letter_id,
            subject=letter.subject,
            msg_id=msg_id,
            stream=ack.stream,
            seq=ack.seq,
            duplicate=bool(ack.duplicate),
        )


# ---- the `baton dlq` command -----------------------------------------------------------------


def _cell(value: str, width: int | None = None) -> str:
    text = printable(value.encode())
    if width is not None and len(text) > width:
        return text[: width - 1] + "…"
    return text


def format_table(letters: list[LetterInfo]) -> str:
    head = ("ID", "FAILED_AT", "CONSUMER", "SUBJECT", "DELIVERIES", "REASON")
    rows = [
        (
            str(x.id),
            x.failed_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            _cell(f"{x.stream}/{x.consumer}"),
            _cell(x.subject),
            str(x.deliveries),
            _cell(x.reason, REASON_WIDTH),
        )
        for x in letters
    ]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]]).rstrip()
        for r in (head, *rows)
    )


def format_letter(letter: Letter) -> str:
    lines = [
        f"id          {letter.id}",
        f"failed_at   {letter.failed_at.isoformat()}",
        f"consumer    {letter.stream}/{letter.consumer}",
        f"subject     {_cell(letter.subject)}",
        f"stream_seq  {letter.stream_seq}",
        f"deliveries  {letter.deliveries}",
        f"reason      {_cell(letter.reason)}",
        f"size        {letter.size} bytes",
        "headers",
        *(f"  {_cell(k)}: {_cell(v)}" for k, v in sorted(letter.headers.items())),
        "payload",
        f"  {letter.preview()}",
    ]
    return "\n".join(lines)


async def _run(args: argparse.Namespace) -> int:
    auth = {
        "user": os.environ.get("BATON_NATS_USER", ""),
        "password": os.environ.get("BATON_NATS_PASSWORD", ""),
    }
    if args.dlq_command == "list":
        letters = await list_letters(args.nats_url, args.limit, args.consumer, **auth)
        if not letters:
            # JSON lines stay parseable: the notice goes to stderr there.
            print("no dead letters", file=sys.stderr if args.json else sys.stdout)
        elif args.json:
            for x in letters:
                print(msgspec.json.encode(x).decode())
        else:
            print(format_table(letters))
    elif args.dlq_command == "show":
        letter = await show(args.nats_url, args.id, **auth)
        print(msgspec.json.encode(letter).decode() if args.json else format_letter(letter))
    else:
        r = await replay(args.nats_url, args.id, **auth)
        if r.duplicate:
            print(
                f"letter {r.letter_id}: {r.subject} was already replayed as {r.msg_id} "
                f"({r.stream} seq {r.seq}); JetStream dropped this copy; letter deleted"
            )
        else:
            print(
                f"letter {r.letter_id} replayed to {r.subject} ({r.stream} seq {r.seq}, "
                f"id {r.msg_id}); letter deleted"
            )
    return 0


def cli(args: argparse.Namespace) -> int:
    """Run ``baton dlq <list|show|replay>``: 0 done, 2 unknown id, 1 anything else refused."""
    try:
        return asyncio.run(_run(args))
    except UnknownLetter as exc:
        print(f"baton dlq: {exc}", file=sys.stderr)
        return 2
    except (DlqError, nats.errors.Error, TimeoutError) as exc:
        # A broker hiccup mid-command is an operator's problem to see, not a traceback.
        print(f"baton dlq: {exc}", file=sys.stderr)
        return 1
