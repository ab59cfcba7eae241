"""``baton archive``: run the retention sweep once, or restore one archived conversation.

Both read the persister's settings from the environment (``PERSISTER_*`` / ``BATON_*``:
database, NATS, ``PERSISTER_ARCHIVE_URL`` and its S3 settings, ``BATON_POLICY_FILE``); flags
override the usual ones. The sweep is the persister's own code (``services/persister/sweep.py``)
under the same advisory lock, so running it by hand next to the persisters is safe.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any
from urllib.parse import urlsplit

import msgspec
import nats
import structlog

from services.persister import archive, config
from services.persister.main import retention_sweeper
from shared import subjects
from shared.bus import Bus
from shared.config import nats_servers
from shared.db import create_pool
from shared.metrics import ServiceMetrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="archive_command", required=True)
    sweep = sub.add_parser("sweep", help="archive and delete what is past its retention, once")
    sweep.add_argument("--force", action="store_true", help="even if a sweep ran this period")
    _common(sweep)
    restore = sub.add_parser("restore", help="bring one archived conversation back, identical")
    restore.add_argument("--conversation", required=True, help="the conversation id")
    restore.add_argument(
        "--from",
        dest="source",
        default="",
        help="the archive's location (file:///…/<id>.jsonl.gz or s3://bucket/key); default: "
        "the one the sweep recorded",
    )
    _common(restore)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", default="", help="default: $BATON_DATABASE_URL")
    p.add_argument("--nats-url", default="", help="default: $BATON_NATS_URL")
    p.add_argument("--archive-url", default="", help="default: $PERSISTER_ARCHIVE_URL")
    p.add_argument("--policy", default="", help="default: $BATON_POLICY_FILE")


def _settings(args: argparse.Namespace) -> config.Settings:
    s = config.from_env()
    changes: dict[str, Any] = {}
    if args.database_url:
        changes["database_url"] = args.database_url
    if args.nats_url:
        changes["nats_url"] = args.nats_url
    if args.archive_url:
        changes["archive_url"] = args.archive_url
    if args.policy:
        changes["policy_file"] = args.policy
    return msgspec.structs.replace(s, **changes)


async def sweep(args: argparse.Namespace) -> dict[str, Any]:
    s = _settings(args)
    log = structlog.get_logger().bind(service="persister")
    metrics = ServiceMetrics("persister")
    pool = await create_pool(str(s.database_url), max_size=2)
    bus = await Bus.connect(s, "persister", metrics, log)
    try:
        sweeper = retention_sweeper(s, pool, bus, metrics)
        if sweeper is None:
            return {"ran": False, "reason": "no archive URL or no retention_days in the policy"}
        result = await sweeper.run_once(force=args.force)
        return msgspec.to_builtins(result)  # type: ignore[no-any-return]
    finally:
        await bus.close()
        await pool.close()


async def _read(s: config.Settings, location: str) -> bytes:
    parts = urlsplit(location)
    if parts.scheme == "file":
        target: archive.Target = archive.Directory("/")
        key = parts.path.lstrip("/")
    elif parts.scheme == "s3":
        target, _ = archive.target(
            archive.Place(
                url=f"s3://{parts.netloc}",
                s3_endpoint=s.archive_s3_endpoint,
                s3_region=s.archive_s3_region,
                s3_access_key_id=s.archive_s3_access_key_id,
                s3_secret_access_key=s.archive_s3_secret_access_key,
            )
        )
        key = parts.path.lstrip("/")
    else:
        raise archive.ArchiveError(f"not an archive location: {location!r}")
    data = await target.get(key)
    if data is None:
        raise archive.ArchiveError(f"no archive at {location}")
    return data


async def restore(args: argparse.Namespace) -> dict[str, Any]:
    s = _settings(args)
    cid = args.conversation
    pool = await create_pool(str(s.database_url), max_size=2)
    try:
        async with pool.acquire() as con:
            known = await con.fetchrow(
                "SELECT location, sha256 FROM archived_conversations WHERE conversation_id = $1",
                archive.parse_id(cid),
            )
            location = args.source or (known["location"] if known else "")
            if not location:
                raise archive.ArchiveError(f"no archive recorded for {cid}: give --from")
            data = await _read(s, location)
            if known and not args.source and archive.sha256(data) != known["sha256"]:
                raise archive.ArchiveError(f"{location} is not the file the sweep wrote")
            header = await archive.restore(con, data, cid)
    finally:
        await pool.close()
    lifted = await _lift_tombstone(s, header.project_id, cid)
    return {
        "restored": cid,
        "from": location,
        "rows": header.counts,
        "tombstone_lifted": lifted,
    }


async def _lift_tombstone(s: config.Settings, project: str, cid: str) -> bool:
    """Purge the conversation's deletion request, so the gateway serves it again (needs a NATS
    user allowed to purge ``CONVERSATIONS``: the admin)."""
    options: dict[str, Any] = {"servers": nats_servers(s.nats_url), "connect_timeout": 5}
    if s.nats_user:
        options.update(user=s.nats_user, password=str(s.nats_password))
    nc = await nats.connect(**options)
    try:
        await nc.jetstream().purge_stream(
            subjects.STREAM_CONVERSATIONS, subject=subjects.conversation_delete(project, cid)
        )
    finally:
        await nc.close()
    return True


def main(args: argparse.Namespace) -> int:
    try:
        if args.archive_command == "sweep":
            out = asyncio.run(sweep(args))
        else:
            out = asyncio.run(restore(args))
    except archive.ArchiveError as exc:
        print(f"baton archive: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(msgspec.json.encode(out).decode() + "\n")
    return 0
