"""Tokens of a real identity provider: RS256/ES256 checked against a JWKS URL.

A real gateway process, and a real HTTP server on 127.0.0.1 serving the key set (started and
stopped by the fixture); the keys are made here. Every check is an HTTP request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.integration.gateway_process import RunningGateway, backing, start_gateway

__all__ = ["backing", "start_gateway"]  # fixtures, used by name

ISSUER = "https://idp.example.test/"
AUDIENCE = "baton-api"


class Key:
    """A signing key of the provider: its private half signs, its public JWK is served."""

    def __init__(self, alg: str) -> None:
        self.alg = alg
        self.kid = f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
        if alg == "RS256":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk = {**jwk, "kid": self.kid, "use": "sig", "alg": alg}

    def public_pem(self) -> bytes:
        pem: bytes = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem

    def sign(self, kid: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {
            "sub": "alice",
            "project": "acme",
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 600,
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": kid or self.kid})


class JwksServer:
    """Serves ``{"keys": [...]}`` at /jwks.json; counts requests; can be made to fail."""

    def __init__(self) -> None:
        self.keys: list[Key] = []
        self.requests = 0
        self.failing = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                if outer.failing or self.path != "/jwks.json":
                    self.send_response(500 if outer.failing else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"keys": [k.jwk for k in outer.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.thread.join(5)


@pytest.fixture
def idp() -> Iterator[JwksServer]:
    server = JwksServer()
    server.keys = [Key("RS256"), Key("ES256")]
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _gateway(
    start_gateway: Callable[..., RunningGateway], idp: JwksServer, **env: str
) -> RunningGateway:
    settings = {
        "jwt_jwks_url": idp.url,
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
        "jwt_jwks_min_refresh_s": "0.2",
        **env,
    }
    return start_gateway(**settings)


def _usage(gw: RunningGateway, token: str) -> httpx.Response:
    return httpx.get(f"{gw.url}/api/usage", headers={"Authorization": f"Bearer {token}"})


def _refused(r: httpx.Response, message: str) -> None:
    assert r.status_code == 401, r.text
    error = r.json()["error"]
    assert error["code"] == "unauthenticated"
    assert message in error["message"], error


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hand_made(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A token built byte by byte: HS256 over ``key``, or no signature (``alg: none``)."""
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    if key is None:
        return head + "."
    return head + "." + _b64(hmac.digest(key, head.encode(), hashlib.sha256))


def test_rs256_and_es256_tokens_of_the_provider_are_accepted(
    start_gateway: Callable[..., RunningGateway], idp: JwksServer
) -> None:
    gw = _gateway(start_gateway, idp)
    for key in idp.keys:
        r = _usage(gw, key.sign())
        assert r.status_code == 200, r.text
        assert r.json()["project_id"] == "acme"
    # The dev HS256 secret still works alongside (make up's default).
    assert httpx.get(f"{gw.url}/api/usage", headers=gw.auth()).status_code == 200
    assert idp.requests == 1  # one fetch served both keys


def test_a_rotated_key_is_picked_up_by_its_new_kid_and_the_old_one_stops_working(
    start_gateway: Callable[..., RunningGateway], idp: JwksServer
) -> None:
    gw = _gateway(start_gateway, idp, jwt_jwks_max_age_s="1")
    old = idp.keys[0]
    assert _usage(gw, old.sign()).status_code == 200
    new = Key("RS256")
    idp.keys = [new]  # the provider rotates: the old key is gone
    deadline = time.monotonic() + 10
    while (r := _usage(gw, new.sign())).status_code != 200:
        _refused(r, "key")  # within the refresh interval: an unknown key, never a 500
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)
    # Once the key set is older than its max age, the old key's tokens are refused.
    deadline = time.monotonic() + 10
    while (r := _usage(gw, old.sign(sub="fresh"))).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _refused(r, "key the identity provider does not list")


def test_alg_none_and_key_confusion_are_refused(
    start_gateway: Callable[..., RunningGateway], idp: JwksServer
) -> None:
    gw = _gateway(start_gateway, idp)
    rsa_key = idp.keys[0]
    now = int(time.time())
    claims = {
        "sub": "mallory",
        "project": "acme",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
    }
    none = _hand_made({"alg": "none", "typ": "JWT", "kid": rsa_key.kid}, claims, None)
    _refused(_usage(gw, none), "algorithm is not accepted")
    # HS256 with the provider's public key as the HMAC secret: a bad dev token, not an RS256.
    confused = _hand_made(
        {"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}, claims, rsa_key.public_pem()
    )
    _refused(_usage(gw, confused), "invalid token")
    # Nor with the JWK's own text, nor with an alg the key does not have.
    as_jwk = _hand_made(
        {"alg": "HS256", "kid": rsa_key.kid}, claims, json.dumps(rsa_key.jwk).encode()
    )
    _refused(_usage(gw, as_jwk), "invalid token")
    es_key = idp.keys[1]
    mislabelled = jwt.encode(
        claims, es_key.private, algorithm="ES256", headers={"kid": rsa_key.kid}
    )
    _refused(_usage(gw, mislabelled), "invalid token")


def test_wrong_audience_issuer_expired_and_missing_claims_are_refused(
    start_gateway: Callable[..., RunningGateway], idp: JwksServer
) -> None:
    gw = _gateway(start_gateway, idp)
    key = idp.keys[0]
    now = int(time.time())
    _refused(_usage(gw, key.sign(aud="someone-else")), "another audience")
    _refused(_usage(gw, key.sign(iss="https://evil.example.test/")), "another issuer")
    _refused(_usage(gw, key.sign(iat=now - 700, exp=now - 100)), "expired")
    _refused(_usage(gw, key.sign(aud=None)), "claim aud")
    _refused(_usage(gw, key.sign(project=None)), "claim project")
    _refused(_usage(gw, key.sign(project="a.b")), "must match")
    # A small clock skew is allowed: issued 30 s "in the future" by the provider's clock.
    assert _usage(gw, key.sign(iat=now + 30, exp=now + 600)).status_code == 200
    _refused(_usage(gw, key.sign(iat=now + 600, exp=now + 900)), "not valid yet")


def test_a_flood_of_unknown_kids_costs_the_provider_a_bounded_number_of_fetches(
    start_gateway: Callable[..., RunningGateway], idp: JwksServer
) -> None:
    gw = _gateway(start_gateway, idp, jwt_jwks_min_refresh_s="60")
    key = idp.keys[0]
    assert _usage(gw, key.sign()).status_code == 200
    before = idp.requests
    for _ in range(40):
        _refused(_usage(gw, key.sign(kid=f"made-up-{uuid.uuid4().hex}")), "does not list")
    assert idp.requests - before <= 1
    assert _usage(gw, key.sign(sub="bob")).status_code == 200  # the known key still works


def test_an_unreachable_provider_is_a_503_never_a_500_or_a_pass(
    start_gateway: Callable[..., RunningGateway], idp: JwksServer
) -> None:
    idp.failing = True
    gw = _gateway(start_gateway, idp)
    r = _usage(gw, idp.keys[0].sign())
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "identity_unavailable"
    assert "retry-after" in r.headers
    # Once it answers again (after the refresh interval), the same token is accepted.
    idp.failing = False
    deadline = time.monotonic() + 10
    while (r := _usage(gw, idp.keys[0].sign())).status_code != 200:
        assert r.status_code == 503, r.text
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_the_claim_names_are_configurable_and_hs256_can_be_turned_off(
    start_gateway: Callable[..., RunningGateway], idp: JwksServer
) -> None:
    gw = _gateway(
        start_gateway, idp, jwt_user_claim="uid", jwt_project_claim="tenant", jwt_hs256="false"
    )
    key = idp.keys[1]
    r = _usage(gw, key.sign(sub="ignored", project=None, uid="alice", tenant="globex"))
    assert r.status_code == 200, r.text
    assert r.json()["project_id"] == "globex"
    _refused(_usage(gw, key.sign()), "claim uid")  # sub/project alone are not enough now
    _refused(httpx.get(f"{gw.url}/api/usage", headers=gw.auth()), "algorithm is not accepted")


def test_a_half_configured_provider_stops_the_gateway_from_starting(
    start_gateway: Callable[..., RunningGateway], idp: JwksServer
) -> None:
    with pytest.raises(AssertionError) as err:
        start_gateway(jwt_jwks_url=idp.url, jwt_issuer=ISSUER)  # no audience
    assert "GATEWAY_JWT_AUDIENCE" in str(err.value)
