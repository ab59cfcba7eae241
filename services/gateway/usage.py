"""The usage report: a project's usage rows summed per day, user or model over a time range.

``GET /api/usage`` without a query stays the running totals (``project_usage``); with
``group_by`` it sums the usage rows themselves, one per model call, so the report and the
totals agree and a deleted or archived conversation's calls still count (the rows keep their
numbers and their user, never content: migration 0009).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from services.gateway.core import ApiError

GROUPS = ("day", "user", "model")

# A day (`2026-12-01`, the whole UTC day) or an RFC 3339 time with its offset; nothing looser
# (``datetime.fromisoformat`` alone would take `20261201` and week dates too).
_DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
_TIME = _DATE + r"[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
DATE_PATTERN = f"^({_DATE}|{_TIME})$"
_DAY_RE = re.compile(f"^{_DATE}$")
_TIME_RE = re.compile(f"^{_TIME}$")

_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


class Query(msgspec.Struct, frozen=True):
    """A report: ``start`` inclusive, ``end`` exclusive (None: unbounded)."""

    group_by: str
    start: datetime | None = None
    end: datetime | None = None


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_query", message)


def parse_time(value: str, name: str, *, end: bool) -> datetime:
    """A bound of the range; a bare date as ``to`` means the end of that day (inclusive)."""
    if len(value) > 40:
        raise _bad(f"{name} must be a date (YYYY-MM-DD) or an RFC 3339 time with offset")
    try:
        if _DAY_RE.match(value):
            day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
            return day + timedelta(days=1) if end else day
        if _TIME_RE.match(value):
            return datetime.fromisoformat(value.upper().replace("Z", "+00:00")).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise _bad(f"{name} is not a real date or time: {value!r}") from exc
    raise _bad(f"{name} must be a date (YYYY-MM-DD) or an RFC 3339 time with offset")


def parse(group_by: str | None, start: str | None, end: str | None) -> Query | None:
    """The report asked for, or None for the plain totals; 400 ``invalid_query`` otherwise."""
    if group_by is None:
        if start is not None or end is not None:
            raise _bad("from and to need group_by (day, user or model)")
        return None
    if group_by not in GROUPS:
        raise _bad("group_by must be one of day, user, model")
    lo = None if start is None else parse_time(start, "from", end=False)
    hi = None if end is None else parse_time(end, "to", end=True)
    if lo is not None and hi is not None and lo >= hi:
        raise _bad("from must be before to")
    return Query(group_by, lo, hi)


# The key column per grouping; never from the client's text (only these three strings).
_KEY = {
    "day": "to_char(date_trunc('day', created_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD')",
    "user": "COALESCE(user_id, '')",
    "model": "model",
}


def sql(group_by: str) -> str:
    """One index range scan of the project's rows (``usage_project_time``), summed per key."""
    key = _KEY[group_by]
    return (
        f"SELECT {key} AS key, "
        + ", ".join(f"SUM({f})::bigint AS {f}" for f in _FIELDS)
        + ", SUM(cost_usd) AS cost_usd, COUNT(*) AS calls, "
        "COUNT(DISTINCT run_id) FILTER (WHERE purpose <> 'classification') AS runs "
        "FROM usage WHERE project_id = $1 "
        "AND ($2::timestamptz IS NULL OR created_at >= $2) "
        "AND ($3::timestamptz IS NULL OR created_at < $3) "
        "GROUP BY 1 ORDER BY 1"
    )


def _row(r: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"key": r["key"]}
    for f in _FIELDS:
        out[f] = int(r[f])
    out["cost_usd"] = float(r["cost_usd"])
    out["calls"] = int(r["calls"])
    out["runs"] = int(r["runs"])
    return out


def report(project_id: str, q: Query, rows: list[Any]) -> dict[str, Any]:
    """The answer: the groups in key order, and their sum."""
    groups = [_row(r) for r in rows]
    total: dict[str, Any] = {f: sum(g[f] for g in groups) for f in (*_FIELDS, "calls")}
    total["cost_usd"] = round(sum(g["cost_usd"] for g in groups), 8)
    return {
        "project_id": project_id,
        "group_by": q.group_by,
        "from": q.start,
        "to": q.end,
        "groups": groups,
        "total": total,
    }


async def fetch(pool: Any, project_id: str, q: Query) -> dict[str, Any]:
    async with pool.acquire() as con:
        rows = await con.fetch(sql(q.group_by), project_id, q.start, q.end)
    return report(project_id, q, list(rows))


_GROUP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["key", *_FIELDS, "cost_usd", "calls", "runs"],
    "properties": {
        "key": {
            "type": "string",
            "description": 'the UTC day (YYYY-MM-DD), the user id (`""`: not known), or the model',
        },
        **{f: {"type": "integer"} for f in _FIELDS},
        "cost_usd": {"type": "number"},
        "calls": {"type": "integer", "description": "model calls (usage rows)"},
        "runs": {"type": "integer", "description": "distinct runs with an answer call"},
    },
}

REPORT_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {
            "type": "object",
            "description": "without group_by: the project's running totals",
            "required": ["project_id", *_FIELDS, "cost_usd", "runs"],
            "properties": {"project_id": {"type": "string"}},
        },
        {
            "type": "object",
            "description": "with group_by: the usage rows summed per key, in key order",
            "required": ["project_id", "group_by", "from", "to", "groups", "total"],
            "properties": {
                "project_id": {"type": "string"},
                "group_by": {"type": "string", "enum": list(GROUPS)},
                "from": {"type": ["string", "null"], "format": "date-time"},
                "to": {"type": ["string", "null"], "format": "date-time"},
                "groups": {"type": "array", "items": _GROUP_SCHEMA},
                "total": {"type": "object"},
            },
        },
    ]
}

GROUP_BY_PARAM: dict[str, Any] = {
    "type": "string",
    "enum": list(GROUPS),
    "description": "sum the usage rows per UTC day, per user or per model (absent: the totals)",
}


def time_param(which: str) -> dict[str, Any]:
    bound = "inclusive" if which == "from" else "exclusive; a bare date means the end of that day"
    return {
        "type": "string",
        "maxLength": 40,
        "pattern": DATE_PATTERN,
        "description": f"YYYY-MM-DD (UTC) or an RFC 3339 time with offset, {bound}; needs "
        "group_by; an impossible date or from not before to is 400 invalid_query",
    }
