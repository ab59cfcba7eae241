"""The API document is what the API does: schemathesis fuzzes every route of a live gateway.

A real gateway process on real NATS and Postgres, a real token, every check schemathesis has
(``--checks all``) over the whole document, so a route added later is fuzzed too. The other
tests pin what the fuzzer found (issue 12): one rule for a malformed id, a 405 with ``Allow``.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from baton.devtoken import make_token
from services.gateway import openapi
from tests.integration.gateway_process import SECRET, RunningGateway, backing, start_gateway

__all__ = ["backing", "start_gateway"]

# Bounded: 15 examples per operation take 27-43 s on a quiet 2-core machine, up to 151 s beside
# a second suite. FUZZ_S only ends a fuzzer that hangs: it measures nothing, so it is generous.
MAX_EXAMPLES = "15"
FUZZ_S = 600


@pytest.fixture
def gateway(start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    # SSE streams end after 0.3 s, so a fuzzed GET …/events gets its whole answer.
    return start_gateway(sse_max_s="0.3")


def _document(gw: RunningGateway) -> dict[str, Any]:
    r = httpx.get(f"{gw.url}/openapi.json", timeout=5)
    assert r.status_code == 200
    doc: dict[str, Any] = r.json()
    return doc


PAGED = ("/api/conversations", "/api/conversations/{conversation_id}/messages")
# Schema-valid yet 400 invalid_query: a date that does not exist (2026-02-30), from not before
# to, or from/to without group_by (a rule between parameters OpenAPI cannot state).
QUERIED = ("/api/usage",)
# Operations anyone may call without a token (everything else needs the bearer JWT).
PUBLIC = {("get", "/version")}


@pytest.mark.timeout(FUZZ_S + 120)
def test_schemathesis_finds_nothing(gateway: RunningGateway, tmp_path: Path) -> None:
    token = make_token(SECRET, "p1", "fuzz")
    # Two statuses more than schemathesis assumes. For valid data: an Idempotency-Key the fuzzer
    # sends again with another body is 422 idempotency_key_reused (the IETF draft's answer to
    # valid input that conflicts with an earlier request). For invalid data: content over
    # maxLength is 413 content_too_large, a rejection like any other 4xx.
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[checks.positive_data_acceptance]\n"
        'expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]\n'
        "[checks.negative_data_rejection]\n"
        'expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415",'
        ' "422", "428", "429"]\n'
        # A cursor is opaque: one the API did not hand out (any string the fuzzer makes, though
        # it fits the documented alphabet) is 400 invalid_cursor, as is before= with after=.
        # Only the two paging operations and the usage report may answer a schema-valid request
        # with a 400.
        + "".join(
            "[[operations]]\n"
            f'include-path = "{path}"\n'
            'include-method = "GET"\n'
            "[operations.checks.positive_data_acceptance]\n"
            'expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "422", "429"]\n'
            for path in (*PAGED, *QUERIED)
        )
        # A conversation's settings within their documented lengths can still exceed the 64 KiB
        # body limit once JSON-escaped (8000 characters of astral text as \\u escapes): 413.
        + "[[operations]]\n"
        'include-path = "/api/conversations"\n'
        'include-method = "POST"\n'
        "[operations.checks.positive_data_acceptance]\n"
        'expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "413", "422", "429"]\n'
    )
    started = time.monotonic()
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file",
            str(config),
            "run",
            f"{gateway.url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            MAX_EXAMPLES,
            "--header",
            f"Authorization: Bearer {token}",
            "--request-timeout",
            "10",
            "--generation-database",
            "none",
            # One worker: hypothesis describing its filters from two threads at once trips
            # CPython 3.11's AST recursion check ("AST constructor recursion depth mismatch").
            "--workers",
            "1",
            "--continue-on-failure",
            # The same cases every run: a failure is the code's, never the draw's.
            "--seed",
            "20261201",
        ],
        cwd=tmp_path,  # its crash cache (.schemathesis/) is written here, not in the checkout
        capture_output=True,
        text=True,
        timeout=FUZZ_S,
        check=False,
    )
    elapsed = time.monotonic() - started
    report = run.stdout + run.stderr[-5000:]
    assert run.returncode == 0, report
    assert "No issues found" in run.stdout or "passed" in run.stdout, report
    print(f"schemathesis: {elapsed:.1f} s\n{run.stdout[-3000:]}")


def test_every_operation_documents_auth_errors_and_uuid_ids(gateway: RunningGateway) -> None:
    doc = _document(gateway)
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": schemes["bearer"]["description"],
    }
    assert schemes["apiKey"] == {
        "type": "apiKey",
        "name": "X-API-Key",
        "in": "header",
        "description": schemes["apiKey"]["description"],
    }
    assert (schemes["actingUser"]["in"], schemes["actingUser"]["name"]) == (
        "header",
        "X-Acting-User",
    )
    error_ref = openapi.ERROR_SCHEMA
    seen = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            seen += 1
            if (method, path) in PUBLIC:
                assert op.get("security") == [], (method, path)
                assert "401" not in op["responses"], (method, path)
                continue
            # A bearer token, or an API key with the acting user (both headers together).
            assert op.get("security") == [
                {"bearer": []},
                {"apiKey": [], "actingUser": []},
            ], (method, path)
            assert "401" in op["responses"], (method, path)
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"] == error_ref
            for param in op.get("parameters", []):
                if param["in"] == "path" and param["name"].endswith("conversation_id"):
                    assert param["schema"]["format"] == "uuid", (method, path)
    assert seen >= 6
    chat = doc["paths"]["/api/chat"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["required"] == ["content"]
    assert {"400", "401", "404", "413", "422", "429", "503"} <= set(chat["responses"])
    assert "Retry-After" in chat["responses"]["429"]["headers"]
    approvals = doc["paths"]["/api/conversations/{conversation_id}/runs/{run_id}/tool-approvals"][
        "post"
    ]
    body = approvals["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["decisions"] and body["additionalProperties"] is False
    assert {"400", "401", "404", "409", "413", "422", "503"} <= set(approvals["responses"])
    events = doc["paths"]["/api/conversations/{conversation_id}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    # The AI SDK chat protocol (services/gateway/ai_sdk.py): the UI message stream and its header.
    ai = doc["paths"]["/api/ai-sdk/chat"]["post"]
    assert ai["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "id",
        "messages",
    ]
    assert "x-vercel-ai-ui-message-stream" in ai["responses"]["200"]["headers"]
    resume = doc["paths"]["/api/ai-sdk/chat/{chat_id}/stream"]["get"]
    assert {"200", "204", "401", "404"} <= set(resume["responses"])
    assert "text/event-stream" in resume["responses"]["200"]["content"]
    # The framework's own 400 body (status_code, detail) is never sent, so never documented.
    assert "status_code" not in str(doc)


ROUTES_WITH_IDS = [
    ("GET", "/api/conversations/{}"),
    ("PATCH", "/api/conversations/{}"),
    ("DELETE", "/api/conversations/{}"),
    ("GET", "/api/conversations/{}/messages"),
    ("GET", "/api/conversations/{}/state"),
    ("GET", "/api/conversations/{}/events"),
    ("POST", "/api/conversations/{}/runs/run-" + str(uuid.UUID(int=1)) + "/cancel"),
    ("POST", "/api/conversations/{}/runs/run-" + str(uuid.UUID(int=1)) + "/tool-approvals"),
]
BAD_IDS = ["nope", "0" * 32, "{" + str(uuid.UUID(int=7)) + "}", "urn:uuid:" + str(uuid.UUID(int=7))]


def test_a_malformed_id_is_400_invalid_id_on_every_route(gateway: RunningGateway) -> None:
    for method, path in ROUTES_WITH_IDS:
        for bad_id in BAD_IDS:
            url = gateway.url + path.format(bad_id)
            r = httpx.request(method, url, headers=gateway.auth(), timeout=5)
            assert r.status_code == 400, (method, url, r.text)
            error = {k: v for k, v in r.json()["error"].items() if k != "request_id"}
            assert error == {
                "status": 400,
                "code": "invalid_id",
                "message": "conversation id must be a UUID",
            }


def test_a_malformed_id_in_the_chat_body_is_400_invalid_id(gateway: RunningGateway) -> None:
    r = httpx.post(
        f"{gateway.url}/api/chat",
        json={"content": "hi", "conversation_id": "0" * 32},
        headers=gateway.auth(),
        timeout=5,
    )
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_id")


def test_an_undocumented_method_is_405_with_allow(gateway: RunningGateway) -> None:
    for path, documented in [("/api/chat", {"POST"}), ("/api/usage", {"GET"})]:
        for method in ["TRACE", "PUT", "DELETE", "PATCH"]:
            r = httpx.request(method, gateway.url + path, headers=gateway.auth(), timeout=5)
            assert r.status_code == 405, (method, path, r.text)
            allowed = {m.strip() for m in r.headers["allow"].split(",")}
            assert allowed - {"OPTIONS", "HEAD"} == documented
            assert r.json()["error"]["code"] == "method_not_allowed"
