"""Gateway settings (env: GATEWAY_* or BATON_*)."""

from __future__ import annotations

from services.gateway.auth import IdentityProvider
from services.gateway.cors import Policy, policy
from services.gateway.limits import EdgeLimits
from shared.config import BaseSettings, Secret, load
from shared.errors import ConfigError


class Settings(BaseSettings, kw_only=True, frozen=True):
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    jwt_secret: Secret = Secret("")
    # Key of ids derived from an Idempotency-Key; empty: derived from jwt_secret (same on
    # every replica). Changing it changes those ids (a retry across the change is a new submit).
    id_secret: Secret = Secret("")
    jwt_max_lifetime_s: float = 30 * 24 * 3600.0  # exp - iat (exp - now without iat)
    jwt_leeway_s: float = 60.0  # how far an issuer's clock may be ahead of ours (iat, nbf)
    # Bearer tokens signed HS256 with jwt_secret (`baton token`, `make up`); off once an
    # identity provider issues every token (jwt_secret still keys stream tokens and ids).
    jwt_hs256: bool = True
    # An identity provider (auth.IdentityProvider): RS256/ES256 tokens checked against the keys
    # at its JWKS URL; issuer and audience are then required. Empty: none.
    jwt_jwks_url: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_user_claim: str = "sub"  # the claim naming the user (its value: [A-Za-z0-9_-]{1,64})
    jwt_project_claim: str = "project"  # the claim naming the project
    jwt_jwks_min_refresh_s: float = 30.0  # an unknown kid refetches at most this often
    jwt_jwks_max_age_s: float = 300.0  # the key set is fetched again when older
    jwt_jwks_timeout_s: float = 3.0
    # Project API keys (X-API-Key + X-Acting-User): each lookup is reused this long, which
    # bounds how long a revoked key still works on a replica.
    api_key_cache_s: float = 2.0
    max_body_bytes: int = 64 * 1024
    max_content_chars: int = 32_000
    max_idempotency_key_chars: int = 255
    publish_timeout_s: float = 3.0
    sse_heartbeat_s: float = 15.0
    sse_queue_size: int = 2048
    # An SSE stream ends after this long (0: never); the client reconnects with Last-Event-ID.
    sse_max_s: float = 0.0
    rate_gate: bool = True  # early 429s from policy's rate windows (off: policy alone refuses)
    rate_cache_s: float = 1.0  # how long a look at a user's rate windows is reused
    sse_send_timeout_s: float = 10.0
    ws_heartbeat_s: float = 15.0
    ws_auth_timeout_s: float = 5.0
    ws_max_frame_bytes: int = 4096
    ws_send_timeout_s: float = 10.0
    ws_ping_interval_s: float = 20.0
    # The HTTP edge (services/gateway/limits.py): bounds applied before a request reaches a route.
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 4096
    max_connections_per_client: int = 256
    # Unexpected errors are logged by type and place; their messages (which may quote the
    # request) and tracebacks only with this on.
    log_error_details: bool = False
    # CORS (cors.py): exact browser origins, comma-separated; empty: no cross-origin access.
    cors_origins: str = ""
    cors_methods: str = "GET,POST,PATCH,DELETE"
    cors_headers: str = (
        "Authorization,Content-Type,Idempotency-Key,Last-Event-ID,X-Request-ID,"
        "X-API-Key,X-Acting-User,traceparent,tracestate"
    )
    cors_max_age_s: int = 600
    # Stream tokens (auth.StreamTokens): how long one lets a browser open its stream.
    stream_token_ttl_s: float = 300.0

    def idp(self) -> IdentityProvider | None:
        """The identity provider these settings name; ConfigError when half configured."""
        if not self.jwt_jwks_url:
            if self.jwt_issuer or self.jwt_audience:
                raise ConfigError("GATEWAY_JWT_ISSUER/AUDIENCE need GATEWAY_JWT_JWKS_URL")
            return None
        if not self.jwt_jwks_url.startswith(("https://", "http://")):
            raise ConfigError("GATEWAY_JWT_JWKS_URL must be an http(s) URL")
        if not (self.jwt_issuer and self.jwt_audience):
            raise ConfigError(
                "GATEWAY_JWT_ISSUER and GATEWAY_JWT_AUDIENCE must be set with GATEWAY_JWT_JWKS_URL"
            )
        return IdentityProvider(
            jwks_url=self.jwt_jwks_url,
            issuer=self.jwt_issuer,
            audience=self.jwt_audience,
            user_claim=self.jwt_user_claim,
            project_claim=self.jwt_project_claim,
            jwks_min_refresh_s=self.jwt_jwks_min_refresh_s,
            jwks_max_age_s=self.jwt_jwks_max_age_s,
            jwks_timeout_s=self.jwt_jwks_timeout_s,
        )

    def cors(self) -> Policy:
        return policy(self.cors_origins, self.cors_methods, self.cors_headers, self.cors_max_age_s)

    def edge_limits(self) -> EdgeLimits:
        return EdgeLimits(
            max_header_bytes=self.max_header_bytes,
            max_headers=self.max_headers,
            header_timeout_s=self.header_timeout_s,
            body_timeout_s=self.body_timeout_s,
            max_connections=self.max_connections,
            max_connections_per_client=self.max_connections_per_client,
        )


def from_env() -> Settings:
    return load(Settings, "GATEWAY")
