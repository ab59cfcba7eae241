"""How long a project's conversations live and how much of one the model sees: the policy file's
``retention_days`` and ``context_messages`` (``[defaults]``, ``[projects.<id>]``).

Policy validates the whole file strictly (``services/policy/policyfile.py`` knows these keys
too); the persister's retention sweep and provisioning (the streams' ``max_age``) read only
these two here, so neither depends on policy's code.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import msgspec

from shared.errors import ConfigError

MAX_FILE_BYTES = 1_000_000
DAY_S = 86_400.0

Days = Annotated[int, msgspec.Meta(ge=1, le=36_500)]
Window = Annotated[int, msgspec.Meta(ge=1, le=100_000)]


class RetentionError(ConfigError):
    """The policy file's retention keys cannot be used; the message names the table."""


class Keep(msgspec.Struct, frozen=True):
    """One project's rules: None means "not limited here" (keep forever / the service default)."""

    retention_days: Days | None = None
    context_messages: Window | None = None


class Retention(msgspec.Struct, frozen=True):
    defaults: Keep = Keep()
    projects: dict[str, Keep] = msgspec.field(default_factory=dict)

    def for_project(self, project: str) -> Keep:
        return self.projects.get(project, self.defaults)

    def shortest_days(self) -> int | None:
        """The shortest retention of any project (the bound on what a shared stream may keep)."""
        days = [k.retention_days for k in (self.defaults, *self.projects.values())]
        known = [d for d in days if d is not None]
        return min(known) if known else None

    @property
    def limited(self) -> bool:
        return self.shortest_days() is not None


def _keep(table: Any, base: Keep, where: str, source: str) -> Keep:
    if not isinstance(table, dict):
        return base
    picked = {k: table[k] for k in ("retention_days", "context_messages") if k in table}
    merged = {**msgspec.structs.asdict(base), **picked}
    try:
        return msgspec.convert(merged, Keep, strict=True)
    except msgspec.ValidationError as exc:
        raise RetentionError(f"{source}: [{where}] {exc}") from exc


def parse(data: bytes, source: str = "policy file") -> Retention:
    """The retention keys of a policy file's bytes (other keys are policy's to check)."""
    if len(data) > MAX_FILE_BYTES:
        raise RetentionError(f"{source}: {len(data)} bytes, more than {MAX_FILE_BYTES}")
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise RetentionError(f"{source}: not a readable TOML file: {exc}") from exc
    defaults = _keep(raw.get("defaults"), Keep(), "defaults", source)
    projects = raw.get("projects")
    named = {
        str(pid): _keep(table, defaults, f"projects.{pid}", source)
        for pid, table in (projects.items() if isinstance(projects, dict) else [])
    }
    return Retention(defaults=defaults, projects=named)


def load(path: str | Path | None) -> Retention:
    """The file's retention, or no limits at all when there is no policy file."""
    if not path:
        return Retention()
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise RetentionError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    return parse(data, str(p))


def stream_max_age_s(configured_s: float, r: Retention) -> float:
    """A content stream's ``max_age``: what it is declared with, and never past the retention."""
    days = r.shortest_days()
    return configured_s if days is None else min(configured_s, days * DAY_S)
