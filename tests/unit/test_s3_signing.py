"""The archive's S3 signer agrees with botocore's own SigV4 signer, byte for byte."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from services.persister import s3

NOW = datetime(2026, 12, 1, 22, 30, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("method", "key", "body", "extra"),
    [
        (
            "PUT",
            "p1/0b7e-conversation.jsonl.gz",
            b"\x1f\x8b data",
            {"content-type": "application/gzip"},
        ),
        ("GET", "archive/acme/c 1+2.jsonl.gz", b"", {}),
        ("PUT", "", b"", {}),  # create a bucket
    ],
)
def test_the_signature_is_botocores(
    method: str, key: str, body: bytes, extra: dict[str, str]
) -> None:
    client = s3.S3(
        "http://127.0.0.1:9000",
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        "eu-west-1",
    )
    url = client.object_url("baton-archive", key)
    digest = hashlib.sha256(body).hexdigest()
    mine = s3.sign(
        method, url, digest, client.access_key, str(client.secret_key), "eu-west-1", NOW, extra
    )

    request = AWSRequest(
        method=method, url=url, data=body, headers={"host": "127.0.0.1:9000", **extra}
    )
    request.context["timestamp"] = NOW.strftime("%Y%m%dT%H%M%SZ")
    auth = S3SigV4Auth(Credentials("AKIDEXAMPLE", str(client.secret_key)), "s3", "eu-west-1")
    auth._modify_request_before_signing(request)
    canonical = auth.canonical_request(request)
    signature = auth.signature(auth.string_to_sign(request, canonical), request)
    assert mine["authorization"].endswith(f"Signature={signature}"), canonical
    assert mine["x-amz-content-sha256"] == request.headers["X-Amz-Content-SHA256"]


def test_the_secret_never_shows_in_a_repr() -> None:
    client = s3.S3("http://127.0.0.1:9000", "AKID", "top-secret")
    assert "top-secret" not in repr(client.secret_key)
