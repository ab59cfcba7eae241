"""Persister settings (env: PERSISTER_* or BATON_*)."""

from __future__ import annotations

from shared.config import BaseSettings, load


class Settings(BaseSettings, kw_only=True, frozen=True):
    pool_size: int = 10


def from_env() -> Settings:
    return load(Settings, "PERSISTER")
