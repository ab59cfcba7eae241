"""A small S3 client: put, get and head one object, signed with AWS Signature V4 over httpx.

Four calls are all the archive needs, so this is ~100 lines on the HTTP client every service
already has, async like the rest of the persister, rather than boto3 (sync, a thread pool,
and botocore's ~100 MB): docs/decisions.md. Path-style addressing
(``<endpoint>/<bucket>/<key>``) works with AWS, MinIO, SeaweedFS, Ceph and moto alike.
``tests/unit/test_s3_signing.py`` checks the signature against botocore's own signer.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

import httpx

from shared.config import Secret

ALGORITHM = "AWS4-HMAC-SHA256"


class S3Error(Exception):
    """An S3 answer other than success (status and the start of the body)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"S3 answered {status}: {detail[:300]}")
        self.status = status


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def signing_key(secret: str, day: str, region: str, service: str = "s3") -> bytes:
    k = _hmac(f"AWS4{secret}".encode(), day)
    return _hmac(_hmac(_hmac(k, region), service), "aws4_request")


def sign(
    method: str,
    url: str,
    payload_sha256: str,
    access_key: str,
    secret_key: str,
    region: str,
    now: datetime,
    extra_headers: dict[str, str] | None = None,
) -> dict[str, str]:
    """The headers that sign one request (``host``, ``x-amz-date``, ``x-amz-content-sha256``,
    ``authorization``), plus ``extra_headers``, which are signed too."""
    parts = urlsplit(url)
    amz_date = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    headers = {
        "host": parts.netloc,
        "x-amz-content-sha256": payload_sha256,
        "x-amz-date": amz_date,
        **{k.lower(): v.strip() for k, v in (extra_headers or {}).items()},
    }
    names = sorted(headers)
    query = "&".join(
        sorted(
            f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
            for k, _, v in (p.partition("=") for p in parts.query.split("&") if p)
        )
    )
    canonical = "\n".join(
        [
            method,
            parts.path or "/",  # already encoded once by object_url (S3 signs it as sent)
            query,
            "".join(f"{n}:{headers[n]}\n" for n in names),
            ";".join(names),
            payload_sha256,
        ]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(
        [ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    signature = hmac.new(
        signing_key(secret_key, day, region), to_sign.encode(), hashlib.sha256
    ).hexdigest()
    headers["authorization"] = (
        f"{ALGORITHM} Credential={access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return headers


class S3:
    """One endpoint and credentials; a bucket per call."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: Secret | str,
        region: str = "us-east-1",
        timeout_s: float = 30.0,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.access_key = access_key
        self.secret_key = Secret(secret_key)
        self.region = region
        self.timeout_s = timeout_s

    def object_url(self, bucket: str, key: str = "") -> str:
        return f"{self.endpoint}/{quote(bucket, safe='')}" + (
            f"/{quote(key, safe='/-_.~')}" if key else ""
        )

    async def _request(
        self, method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> httpx.Response:
        digest = hashlib.sha256(body).hexdigest()
        signed = sign(
            method,
            url,
            digest,
            self.access_key,
            str(self.secret_key),
            self.region,
            datetime.now(UTC),
            headers,
        )
        signed.pop("host")  # httpx sends the same one itself
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            return await client.request(method, url, content=body or None, headers=signed)

    async def create_bucket(self, bucket: str) -> None:
        r = await self._request("PUT", self.object_url(bucket))
        if r.status_code not in (200, 409):  # 409: it exists already
            raise S3Error(r.status_code, r.text)

    async def put(self, bucket: str, key: str, body: bytes, content_type: str) -> None:
        r = await self._request(
            "PUT", self.object_url(bucket, key), body, {"content-type": content_type}
        )
        if r.status_code != 200:
            raise S3Error(r.status_code, r.text)

    async def get(self, bucket: str, key: str) -> bytes | None:
        r = await self._request("GET", self.object_url(bucket, key))
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise S3Error(r.status_code, r.text)
        return r.content
