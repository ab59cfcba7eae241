"""Who is calling: bearer JWTs checked against the gateway's rules, remembered until they expire."""

from __future__ import annotations

import hmac
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt

from services.gateway.core import ApiError, Principal
from shared.subjects import is_safe_token

MAX_TOKEN_LIFETIME_S = 30 * 24 * 3600.0  # what `baton token` makes by default
TOKEN_LEEWAY_S = 60.0  # how far an issuer's clock may be ahead (iat, nbf)


def authenticate(header: str | None, secret: str) -> Principal:
    """The caller behind a ``Bearer`` JWT, under the default lifetime rules."""
    return verify(header, secret)[0]


def verify(
    header: str | None,
    secret: str,
    max_lifetime_s: float = MAX_TOKEN_LIFETIME_S,
    leeway_s: float = TOKEN_LEEWAY_S,
    now: float | None = None,
) -> tuple[Principal, float]:
    """The caller behind a ``Bearer`` JWT and until when it may be trusted (epoch seconds).

    HS256, claims ``sub``, ``project`` and ``exp``; a token lives at most ``max_lifetime_s``,
    counted from its ``iat`` (which must not be in the future), or from now when it has none.
    Each failure class has one message of ours: the JWT library's words never reach a client.
    """
    if not header or not header.startswith("Bearer "):
        raise ApiError(401, "unauthenticated", "missing bearer token")
    now = time.time() if now is None else now
    try:
        claims = jwt.decode(
            header[7:].strip(),
            secret,
            algorithms=["HS256"],
            # exp and iat are checked below, against the same clock as the lifetime.
            options={
                "require": ["sub", "project", "exp"],
                "verify_exp": False,
                "verify_iat": False,
            },
            leeway=leeway_s,
        )
    except jwt.ImmatureSignatureError:
        raise _unauthenticated("token is not valid yet") from None
    except jwt.MissingRequiredClaimError:
        raise _unauthenticated("token must carry the claims sub, project and exp") from None
    except jwt.PyJWTError:
        raise _unauthenticated("invalid token") from None
    user, project = claims.get("sub"), claims.get("project")
    if not (isinstance(user, str) and isinstance(project, str)):
        raise ApiError(401, "unauthenticated", "token claims sub and project must be strings")
    if not (is_safe_token(user) and is_safe_token(project)):
        raise ApiError(401, "unauthenticated", "token claims must match [A-Za-z0-9_-]{1,64}")
    expires = _epoch(claims["exp"])
    issued = None if claims.get("iat") is None else _epoch(claims["iat"])
    if expires <= now:  # an issuer's clock ahead of ours shortens a token, never lengthens it
        raise _unauthenticated("token has expired")
    if issued is not None and issued > now + leeway_s:
        raise _unauthenticated("token is not valid yet")
    start = now if issued is None else issued
    if expires - start > max_lifetime_s + (leeway_s if issued is None else 0.0):
        raise _unauthenticated(f"token lifetime exceeds the maximum ({max_lifetime_s:.0f} s)")
    return Principal(project=project, user=user), expires


def _epoch(value: Any) -> float:
    """A time claim as epoch seconds; anything but a finite number is an invalid token."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _unauthenticated("invalid token")
    return float(value)


def _unauthenticated(message: str) -> ApiError:
    return ApiError(401, "unauthenticated", message)


class Principals:
    """Verified tokens remembered until they expire: one HS256 check per token, not per request.

    Only successes are kept, so a bad token is checked (and refused) every time; the table
    is bounded and simply starts over when full. A token's lifetime is bounded
    (``max_lifetime_s``), so no entry outlives it.
    """

    def __init__(
        self,
        secret: str,
        clock: Callable[[], float] = time.time,
        max_entries: int = 10_000,
        max_lifetime_s: float = MAX_TOKEN_LIFETIME_S,
        leeway_s: float = TOKEN_LEEWAY_S,
    ) -> None:
        self.secret = secret
        self.clock = clock
        self.max_entries = max_entries
        self.max_lifetime_s = max_lifetime_s
        self.leeway_s = leeway_s
        self.known: dict[str, tuple[Principal, float]] = {}

    def authenticate(self, header: str | None) -> Principal:
        now = self.clock()
        if header is not None:
            hit = self.known.get(header)
            if hit is not None and now < hit[1]:
                return hit[0]
        principal, expires = verify(header, self.secret, self.max_lifetime_s, self.leeway_s, now)
        assert header is not None  # verify() refuses a missing header
        if len(self.known) >= self.max_entries:
            self.known.clear()
        self.known[header] = (principal, expires)
        return principal


# ---- stream tokens (browsers: EventSource and WebSocket cannot send a header) ---------------

STREAM_KEY_LABEL = b"baton stream tokens v1"
STREAM_AUDIENCE = "baton:stream"


class StreamTokens:
    """Short-lived tokens that open one conversation's push stream, and nothing else.

    Signed with a key derived from the JWT secret (never the secret itself): a stream token is
    no bearer token and a bearer token is no stream token, whichever place each is put in.
    The audience and the conversation claim scope it; ``ttl_s`` bounds it to minutes.
    """

    def __init__(
        self, jwt_secret: str, ttl_s: float = 300.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.key = hmac.digest(jwt_secret.encode(), STREAM_KEY_LABEL, "sha256")
        self.ttl_s = ttl_s
        self.clock = clock

    def mint(self, p: Principal, conversation_id: str) -> tuple[str, float]:
        """A token for ``p`` to watch ``conversation_id`` (owned by ``p``), and its expiry."""
        now = self.clock()
        expires = now + self.ttl_s
        claims = {
            "sub": p.user,
            "project": p.project,
            "cid": conversation_id,
            "aud": STREAM_AUDIENCE,
            "iat": int(now),
            "exp": int(expires),
        }
        return jwt.encode(claims, self.key, algorithm="HS256"), float(int(expires))

    def verify(self, token: str, conversation_id: str) -> Principal:
        """The watcher a stream token names, if it is valid for this conversation now."""
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=["HS256"],
                audience=STREAM_AUDIENCE,
                options={"require": ["sub", "project", "cid", "aud", "exp"], "verify_iat": False},
            )
        except jwt.ExpiredSignatureError:
            raise _unauthenticated("stream token has expired; ask for a new one") from None
        except jwt.PyJWTError:
            raise _unauthenticated(
                "access_token must be a stream token of this conversation "
                "(POST /api/conversations/{id}/stream-token); bearer tokens go in the header"
            ) from None
        user, project, cid = claims.get("sub"), claims.get("project"), claims.get("cid")
        if not all(isinstance(v, str) for v in (user, project, cid)):
            raise _unauthenticated("invalid stream token")
        assert isinstance(user, str) and isinstance(project, str) and isinstance(cid, str)
        if not (is_safe_token(user) and is_safe_token(project)):
            raise _unauthenticated("invalid stream token")
        if float(claims["exp"]) - self.clock() > self.ttl_s + TOKEN_LEEWAY_S:
            raise _unauthenticated("invalid stream token")  # minted under a longer ttl
        if cid != _uuid_or_none(conversation_id):
            raise _unauthenticated("stream token is for another conversation")
        return Principal(project=project, user=user)


def _uuid_or_none(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        return None
