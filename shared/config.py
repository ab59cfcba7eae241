"""Settings read once from the environment into frozen objects, then passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from shared.errors import ConfigError

T = TypeVar("T", bound=msgspec.Struct)


class Secret(str):
    """A string that never shows itself in logs or reprs."""

    def __repr__(self) -> str:
        return "Secret('***')"


class BaseSettings(msgspec.Struct, kw_only=True, frozen=True):
    """What every service needs."""

    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str = ""
    nats_password: Secret = Secret("")
    # How long the first connect to NATS keeps trying before the service exits (non-zero).
    nats_connect_timeout_s: float = 60.0
    database_url: Secret = Secret("")
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_level: str = "info"
    instance: str = ""
    shutdown_grace_s: float = 20.0
    fetch_batch: int = 32
    concurrency: int = 16


def nats_servers(url: str) -> list[str]:
    """The server list in a ``BATON_NATS_URL``: one URL or several, comma-separated (a cluster)."""
    servers = [part.strip() for part in url.split(",")]
    if not servers or any(not s for s in servers):
        raise ConfigError(f"BATON_NATS_URL has an empty entry: {url!r}")
    for server in servers:
        scheme, sep, rest = server.partition("://")
        if not sep or scheme not in ("nats", "tls", "ws", "wss") or not rest:
            raise ConfigError(f"BATON_NATS_URL entry is not a nats:// URL: {server!r}")
    return servers


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is Secret and isinstance(value, str):
        return Secret(value)
    raise NotImplementedError(f"cannot read {kind.__name__} from the environment")


def load(cls: type[T], prefix: str, environ: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from variables named ``BATON_<FIELD>`` or ``<prefix>_<FIELD>``.

    The service prefix wins over the shared one, so one environment can serve all five.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        for name in (f"{prefix}_{field.name}".upper(), f"BATON_{field.name}".upper()):
            if name in env:
                raw[field.name] = env[name]
                break
    try:
        return msgspec.convert(raw, cls, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc
