"""Dev JWTs signed with a secret generated once per data dir."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import jwt

from baton import private

SECRET_FILE = "jwt_secret"


def secret_for(data_dir: Path) -> str:
    """The data dir's signing secret, created on first use and readable only by its owner."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        private.make_dir(data_dir)
        private.create_once(path, secrets.token_urlsafe(48))
    return path.read_text().strip()


def make_token(secret: str, project: str, user: str, ttl_s: int = 30 * 24 * 3600) -> str:
    now = int(time.time())
    return jwt.encode(
        {"sub": user, "project": project, "iat": now, "exp": now + ttl_s}, secret, algorithm="HS256"
    )
