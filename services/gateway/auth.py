"""Who is calling: bearer JWTs (dev HS256, an identity provider's JWKS), project API keys, stream tokens."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import httpx
import jwt
import msgspec
import structlog

from services.gateway.core import ApiError, Principal
from shared.db import UNAVAILABLE
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
    token = bearer(header)
    now = time.time() if now is None else now
    try:
        claims = jwt.decode(
            token,
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
    return checked(claims, "sub", "project", max_lifetime_s, leeway_s, now)


def bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer …`` header."""
    if not header or not header.startswith("Bearer "):
        raise ApiError(401, "unauthenticated", "missing bearer token")
    return header[7:].strip()


def checked(
    claims: dict[str, Any],
    user_claim: str,
    project_claim: str,
    max_lifetime_s: float,
    leeway_s: float,
    now: float,
) -> tuple[Principal, float]:
    """The principal a verified token's claims name, and its expiry, under our time rules."""
    user, project = claims.get(user_claim), claims.get(project_claim)
    if not (isinstance(user, str) and isinstance(project, str)):
        raise ApiError(
            401, "unauthenticated", f"token claims {user_claim} and {project_claim} must be strings"
        )
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
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _unauthenticated("invalid token")
    try:
        epoch = float(value)  # an int no float holds (JSON allows 10**400) overflows
    except OverflowError:
        raise _unauthenticated("invalid token") from None
    if not math.isfinite(epoch):
        raise _unauthenticated("invalid token")
    return epoch


def _unauthenticated(message: str) -> ApiError:
    return ApiError(401, "unauthenticated", message)


# ---- identity providers: RS256/ES256 tokens verified against a JWKS URL ---------------------

IDP_ALGORITHMS = ("RS256", "ES256")


def _unavailable(message: str) -> ApiError:
    return ApiError(503, "identity_unavailable", message, headers={"Retry-After": "5"})


class Jwks:
    """An identity provider's signing keys, fetched from its JWKS URL and kept.

    A token naming a ``kid`` we do not hold makes us fetch the set again, but at most once
    per ``min_refresh_s`` (a flood of made-up kids costs the provider one request per
    interval, not one per token); the set is also fetched again when older than ``max_age_s``.
    A failed fetch keeps the keys we have; with none at all, or for a kid only a fetch could
    find, the caller gets ``503 identity_unavailable`` (never a 500, never a pass).
    """

    def __init__(
        self,
        url: str,
        min_refresh_s: float = 30.0,
        max_age_s: float = 300.0,
        timeout_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.min_refresh_s = min_refresh_s
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched_at = -math.inf  # last successful fetch
        self.tried_at = -math.inf  # last attempt, successful or not
        self.failed = False
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> jwt.PyJWK:
        now = self.clock()
        stale = now - self.fetched_at > self.max_age_s
        if kid not in self.keys or stale:
            async with self._lock:  # one fetch at a time; waiters see its result
                if (kid not in self.keys or stale) and self.clock() - self.tried_at >= (
                    self.min_refresh_s
                ):
                    await self._fetch()
        found = self.keys.get(kid)
        if found is not None:
            return found
        if self.failed:
            raise _unavailable("the identity provider's keys cannot be fetched; retry shortly")
        raise _unauthenticated("token is signed with a key the identity provider does not list")

    async def _fetch(self) -> None:
        self.tried_at = self.clock()
        log = structlog.get_logger().bind(service="gateway", jwks_url=self.url)
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                r = await client.get(self.url, headers={"Accept": "application/json"})
            r.raise_for_status()
            document = r.json()
            keys = {}
            for entry in document.get("keys", []) if isinstance(document, dict) else []:
                if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                    continue
                kid = entry.get("kid")
                try:
                    jwk = jwt.PyJWK(entry)
                except jwt.PyJWTError:
                    continue  # an algorithm or key type we do not take
                if isinstance(kid, str) and jwk.algorithm_name in IDP_ALGORITHMS:
                    keys[kid] = jwk
        except (httpx.HTTPError, ValueError) as exc:
            self.failed = True
            log.warning("jwks_fetch_failed", error_type=type(exc).__name__)
            return
        self.keys, self.fetched_at, self.failed = keys, self.tried_at, False
        log.info("jwks_fetched", keys=len(keys))


class IdentityProvider(msgspec.Struct, frozen=True, kw_only=True):
    """How tokens of a real identity provider are checked (gateway settings ``jwt_*``)."""

    jwks_url: str
    issuer: str
    audience: str
    user_claim: str = "sub"
    project_claim: str = "project"
    jwks_min_refresh_s: float = 30.0
    jwks_max_age_s: float = 300.0
    jwks_timeout_s: float = 3.0


class Credentials(NamedTuple):
    """What a request presents: a bearer header, or a project API key and the acting user."""

    authorization: str | None
    api_key: str | None = None
    acting_user: str | None = None

    @classmethod
    def of(cls, headers: Any) -> Credentials:
        return cls(
            headers.get("authorization"), headers.get("x-api-key"), headers.get("x-acting-user")
        )


class ApiKeyLookup(Protocol):
    async def project_of(self, key_hash: str) -> str | None:
        """The project of an active key with this hash; None: unknown or revoked."""


def api_key_hash(key: str) -> str:
    """What is stored of an API key: its SHA-256 (the key has 256 bits of entropy)."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """API keys checked against the read model, each answer kept for ``ttl_s``.

    The TTL is what makes a revocation reach every replica: each looks again within ``ttl_s``.
    Unknown keys are remembered too (a flood of made-up keys costs one query per key and
    TTL), in a bounded table that starts over when full.
    """

    def __init__(
        self,
        lookup: ApiKeyLookup,
        ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10_000,
    ) -> None:
        self.lookup = lookup
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_entries = max_entries
        self.known: dict[str, tuple[str | None, float]] = {}

    async def principal(self, key: str, acting_user: str | None) -> Principal:
        if acting_user is None:
            raise _unauthenticated("an API key needs the acting user in X-Acting-User")
        if not is_safe_token(acting_user):
            raise _unauthenticated("X-Acting-User must match [A-Za-z0-9_-]{1,64}")
        if not key or len(key) > 128:
            raise _unauthenticated("invalid API key")
        project = await self.project(api_key_hash(key))
        if project is None:
            raise _unauthenticated("unknown or revoked API key")
        return Principal(project=project, user=acting_user)

    async def project(self, digest: str) -> str | None:
        """The project of the active key with this hash (None: unknown or revoked), cached."""
        now = self.clock()
        hit = self.known.get(digest)
        if hit is not None and now < hit[1]:
            return hit[0]
        try:
            project = await self.lookup.project_of(digest)
        except UNAVAILABLE:
            raise ApiError(
                503, "database_unavailable", "API keys cannot be checked now; retry shortly"
            ) from None
        if len(self.known) >= self.max_entries:
            self.known.clear()
        self.known[digest] = (project, now + self.ttl_s)
        return project


class Principals:
    """Who is calling, from a request's credentials; verified tokens remembered until they expire.

    Bearer tokens: HS256 signed with the gateway's secret (unless ``hs256`` is off), and, with an
    ``idp``, RS256/ES256 from its JWKS. The token's ``alg`` picks the path and each path takes
    its algorithms only, so a token signed with HMAC over a public key is just a bad HS256
    token, and ``alg: none`` is no path at all. Only successes are kept (an identity
    provider's for at most the key set's ``max_age_s``), so a bad token is refused every time;
    the table is bounded and simply starts over when full.
    """

    def __init__(
        self,
        secret: str,
        clock: Callable[[], float] = time.time,
        max_entries: int = 10_000,
        max_lifetime_s: float = MAX_TOKEN_LIFETIME_S,
        leeway_s: float = TOKEN_LEEWAY_S,
        hs256: bool = True,
        idp: IdentityProvider | None = None,
        api_keys: ApiKeys | None = None,
    ) -> None:
        self.secret = secret
        self.clock = clock
        self.max_entries = max_entries
        self.max_lifetime_s = max_lifetime_s
        self.leeway_s = leeway_s
        self.hs256 = hs256
        self.idp = idp
        self.jwks = (
            None
            if idp is None
            else Jwks(idp.jwks_url, idp.jwks_min_refresh_s, idp.jwks_max_age_s, idp.jwks_timeout_s)
        )
        self.api_keys = api_keys
        self.known: dict[str, tuple[Principal, float]] = {}

    async def authenticate(self, credentials: Credentials | str | None) -> Principal:
        if not isinstance(credentials, Credentials):
            credentials = Credentials(credentials)
        if credentials.api_key is not None:
            if credentials.authorization is not None:
                raise _unauthenticated("send a bearer token or an API key, not both")
            if self.api_keys is None:
                raise _unauthenticated("API keys are not accepted here")
            return await self.api_keys.principal(credentials.api_key, credentials.acting_user)
        if credentials.acting_user is not None:
            raise _unauthenticated("X-Acting-User goes with X-API-Key only")
        header = credentials.authorization
        now = self.clock()
        if header is not None:
            hit = self.known.get(header)
            if hit is not None and now < hit[1]:
                return hit[0]
        token = bearer(header)
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise _unauthenticated("invalid token") from None
        if alg == "HS256" and self.hs256:
            principal, until = verify(header, self.secret, self.max_lifetime_s, self.leeway_s, now)
        elif alg in IDP_ALGORITHMS and self.idp is not None:
            principal, until = await self._from_idp(token, alg, now)
        else:
            raise _unauthenticated("token algorithm is not accepted")
        assert header is not None  # bearer() refuses a missing header
        if len(self.known) >= self.max_entries:
            self.known.clear()
        self.known[header] = (principal, until)
        return principal

    async def _from_idp(self, token: str, alg: str, now: float) -> tuple[Principal, float]:
        assert self.idp is not None and self.jwks is not None
        kid = jwt.get_unverified_header(token).get("kid")
        if not isinstance(kid, str):
            raise _unauthenticated("token names no key (kid)")
        key = await self.jwks.key(kid)
        idp = self.idp
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=idp.audience,
                issuer=idp.issuer,
                options={
                    "require": ["exp", "iss", "aud", idp.user_claim, idp.project_claim],
                    "verify_exp": False,  # checked in checked(), on our clock
                    "verify_iat": False,
                },
                leeway=self.leeway_s,
            )
        except jwt.InvalidAudienceError:
            raise _unauthenticated("token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise _unauthenticated("token is from another issuer") from None
        except jwt.ImmatureSignatureError:
            raise _unauthenticated("token is not valid yet") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _unauthenticated(f"token must carry the claim {exc.claim}") from None
        except jwt.PyJWTError:
            raise _unauthenticated("invalid token") from None
        principal, expires = checked(
            claims, idp.user_claim, idp.project_claim, self.max_lifetime_s, self.leeway_s, now
        )
        # Kept no longer than the key set is: a key the provider drops stops working then.
        return principal, min(expires, now + idp.jwks_max_age_s)


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

    def mint(
        self, p: Principal, conversation_id: str, key_hash: str | None = None
    ) -> tuple[str, float]:
        """A token for ``p`` to watch ``conversation_id`` (owned by ``p``), and its expiry.

        ``key_hash``: the hash of the API key it was minted with (claim ``akh``): a stream it
        opens ends once that key is revoked, as the key's own streams do.
        """
        now = self.clock()
        expires = now + self.ttl_s
        claims: dict[str, Any] = {
            "sub": p.user,
            "project": p.project,
            "cid": conversation_id,
            "aud": STREAM_AUDIENCE,
            "iat": int(now),
            "exp": int(expires),
        }
        if key_hash is not None:
            claims["akh"] = key_hash
        return jwt.encode(claims, self.key, algorithm="HS256"), float(int(expires))

    def verify(self, token: str, conversation_id: str) -> Principal:
        """The watcher a stream token names, if it is valid for this conversation now."""
        return self.verify_key(token, conversation_id)[0]

    def verify_key(self, token: str, conversation_id: str) -> tuple[Principal, str | None]:
        """As ``verify``, and the hash of the API key it was minted with (None: a bearer's)."""
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
        key_hash = claims.get("akh")
        if key_hash is not None and not isinstance(key_hash, str):
            raise _unauthenticated("invalid stream token")
        return Principal(project=project, user=user), key_hash


def _uuid_or_none(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        return None
