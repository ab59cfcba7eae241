"""One conversation as one gzipped JSONL file (its rows, exactly), where it is kept, and back.

Line 1 is a header (``format``, the ids, the row counts); every other line is one row,
``{"table": …, "row": …}``, as Postgres itself renders it (``row_to_json``), and a restore
reads it back with ``json_populate_record``: every column, every type, without a column list
here to fall out of date. The file is deterministic (sorted rows, gzip without a time), so
archiving the same rows twice writes the same bytes — an interrupted sweep that runs again
overwrites a file with itself.

Where: a directory (``file:///var/lib/baton/archive``) or an S3-compatible bucket
(``s3://bucket/prefix``); the key is ``<prefix>/<project>/<conversation id>.jsonl.gz``.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import msgspec

from services.persister.s3 import S3
from shared.config import Secret

FORMAT = "baton-archive/1"
CONTENT_TYPE = "application/gzip"

# (table, how its rows of one conversation are found, their order). ``$1`` the conversation,
# ``$2`` its run ids. Usage rows are kept by a deletion (billing), the others are not.
TABLES: tuple[tuple[str, str, str], ...] = (
    ("conversations", "id = $1", "id"),
    ("messages", "conversation_id = $1", "seq"),
    ("runs", "conversation_id = $1", "run_id"),
    ("usage", "conversation_id = $1 OR run_id = ANY($2::text[])", "call_id"),
    ("tool_turns", "conversation_id = $1", "run_id, round"),
    ("tool_results", "run_id = ANY($2::text[])", "run_id, tool_use_id"),
)
# What identifies a row of each table (a restore replaces rows by it).
KEYS = {
    "conversations": ("id",),
    "messages": ("id",),
    "runs": ("run_id",),
    "usage": ("call_id",),
    "tool_turns": ("run_id", "round"),
    "tool_results": ("run_id", "tool_use_id"),
}


class Header(msgspec.Struct, frozen=True):
    format: str
    conversation_id: str
    project_id: str
    user_id: str
    last_activity_at: str
    counts: dict[str, int]


class ArchiveError(Exception):
    """An archive that cannot be read back, or a restore that would overwrite live rows."""


def parse_id(conversation_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(conversation_id)
    except ValueError as exc:
        raise ArchiveError(f"not a conversation id: {conversation_id!r}") from exc


def object_key(prefix: str, project: str, conversation: str) -> str:
    name = f"{project}/{conversation}.jsonl.gz"
    return f"{prefix.strip('/')}/{name}" if prefix.strip("/") else name


async def dump(con: Any, conversation_id: str) -> list[tuple[str, str]]:
    """Every row of the conversation as (table, JSON text), in a stable order. Call it inside a
    REPEATABLE READ transaction so that the rows are one moment's."""
    cid = uuid.UUID(conversation_id)
    runs = [
        r["run_id"]
        for r in await con.fetch("SELECT run_id FROM runs WHERE conversation_id = $1", cid)
    ]
    out: list[tuple[str, str]] = []
    for table, where, order in TABLES:
        args: list[Any] = [cid] + ([runs] if "$2" in where else [])
        if "$1" not in where:
            where = where.replace("$2", "$1")
            args = [runs]
        rows = await con.fetch(
            f"SELECT row_to_json(t)::text AS j FROM {table} t WHERE {where} ORDER BY {order}",
            *args,
        )
        out.extend((table, r["j"]) for r in rows)
    return out


def encode(rows: list[tuple[str, str]]) -> bytes:
    """The file: a header line, then one line per row; gzip with no name and no time."""
    conv = next((msgspec.json.decode(j) for t, j in rows if t == "conversations"), None)
    if conv is None:
        raise ArchiveError("no conversation row to archive")
    counts: dict[str, int] = {}
    for table, _ in rows:
        counts[table] = counts.get(table, 0) + 1
    header = Header(
        format=FORMAT,
        conversation_id=conv["id"],
        project_id=conv["project_id"],
        user_id=conv["user_id"],
        last_activity_at=conv["last_activity_at"],
        counts=counts,
    )
    lines = [msgspec.json.encode(header)]
    lines.extend(b'{"table":"' + t.encode() + b'","row":' + j.encode() + b"}" for t, j in rows)
    return gzip.compress(b"\n".join(lines) + b"\n", mtime=0)


def decode(data: bytes) -> tuple[Header, list[tuple[str, str]]]:
    """The header and rows of a file; ArchiveError when it is not a whole archive."""
    try:
        text = gzip.decompress(data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"not a gzipped archive: {exc}") from exc
    lines = text.splitlines()
    try:
        header = msgspec.json.decode(lines[0], type=Header)
        rows = []
        for line in lines[1:]:
            item = msgspec.json.decode(line)  # a whole JSON object, or DecodeError
            if item["table"] not in KEYS:
                raise ArchiveError(f"unknown table {item['table']!r}")
            # The row exactly as Postgres wrote it (numeric scale and all), not re-encoded.
            head = f'{{"table":"{item["table"]}","row":'
            if not (line.startswith(head) and line.endswith("}")):
                raise ArchiveError("malformed archive line")
            rows.append((item["table"], line[len(head) : -1]))
    except (IndexError, KeyError, TypeError, msgspec.DecodeError) as exc:
        raise ArchiveError(f"malformed archive: {exc}") from exc
    if header.format != FORMAT:
        raise ArchiveError(f"unknown archive format {header.format!r}")
    counts: dict[str, int] = {}
    for table, _ in rows:
        counts[table] = counts.get(table, 0) + 1
    if counts != header.counts:
        raise ArchiveError(f"truncated archive: rows {counts}, header says {header.counts}")
    return header, rows


async def restore(con: Any, data: bytes, conversation_id: str) -> Header:
    """Put an archived conversation back, every row as it was, in one transaction.

    Refused while the conversation still exists (its rows are the live ones); a deletion's
    tombstone row is replaced (the restored row has no ``deleted_at``). Rows a deletion kept
    (runs, usage: their numbers) are replaced by the archived ones; the project totals are not
    touched (they never lost those calls).
    """
    header, rows = decode(data)
    if header.conversation_id != conversation_id:
        raise ArchiveError(
            f"the archive holds conversation {header.conversation_id}, not {conversation_id}"
        )
    async with con.transaction():
        cid = uuid.UUID(conversation_id)
        row = await con.fetchrow("SELECT deleted_at FROM conversations WHERE id = $1", cid)
        if row is not None and row["deleted_at"] is None:
            raise ArchiveError(f"conversation {conversation_id} exists: delete it first")
        # A deletion's tombstone row (migration 0008) gives way to the archived row.
        await con.execute("DELETE FROM conversations WHERE id = $1 AND deleted_at IS NOT NULL", cid)
        for table, _, _ in TABLES:
            mine = [j for t, j in rows if t == table]
            if not mine:
                continue
            keys = KEYS[table]
            match = " AND ".join(f"t.{k} = r.{k}" for k in keys)
            await con.execute(
                f"DELETE FROM {table} t USING json_populate_recordset(NULL::{table}, $1::json) r "
                f"WHERE {match}",
                "[" + ",".join(mine) + "]",
            )
            await con.execute(
                f"INSERT INTO {table} SELECT * FROM json_populate_recordset(NULL::{table}, $1::json)",
                "[" + ",".join(mine) + "]",
            )
        # The message trigger counted the restored messages again: put the archived numbers back.
        conv = next(j for t, j in rows if t == "conversations")
        await con.execute(
            "UPDATE conversations c SET message_count = r.message_count, "
            "last_activity_at = r.last_activity_at "
            "FROM json_populate_record(NULL::conversations, $1::json) r WHERE c.id = r.id",
            conv,
        )
    return header


# ---- where archives are kept ---------------------------------------------------------------


class Target(Protocol):
    location: str

    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes | None: ...


class Directory:
    """Files under a directory, written whole or not at all (temp file, fsync, rename)."""

    def __init__(self, root: str | Path, prefix: str = "") -> None:
        self.root = Path(root)
        self.prefix = prefix
        self.location = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ArchiveError(f"key {key!r} leaves the archive directory")
        return path

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, self._path(key), data)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def get(self, key: str) -> bytes | None:
        path = self._path(key)
        return await asyncio.to_thread(lambda: path.read_bytes() if path.exists() else None)


class Bucket:
    """Objects in an S3-compatible bucket (a PUT is whole or not at all)."""

    def __init__(self, client: S3, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.location = f"s3://{bucket}"  # keys carry the prefix

    async def put(self, key: str, data: bytes) -> None:
        await self.client.put(self.bucket, key, data, CONTENT_TYPE)

    async def get(self, key: str) -> bytes | None:
        return await self.client.get(self.bucket, key)


class Place(msgspec.Struct, frozen=True):
    """Where archives go: ``file:///dir`` or ``s3://bucket/prefix`` (and the S3 endpoint)."""

    url: str
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: Secret = Secret("")


def target(place: Place) -> tuple[Target, str]:
    """The target of a place and the key prefix inside it."""
    parts = urlsplit(place.url)
    if parts.scheme == "file" and parts.path:
        return Directory(parts.path), ""
    if parts.scheme == "s3" and parts.netloc:
        if not place.s3_endpoint:
            raise ArchiveError("an s3:// archive needs its endpoint (ARCHIVE S3 endpoint)")
        client = S3(
            place.s3_endpoint,
            place.s3_access_key_id,
            place.s3_secret_access_key,
            place.s3_region,
        )
        prefix = parts.path.strip("/")
        return Bucket(client, parts.netloc, prefix), prefix
    raise ArchiveError(f"archive URL must be file:///dir or s3://bucket/prefix, not {place.url!r}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
