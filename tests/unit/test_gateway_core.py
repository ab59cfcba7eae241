"""Gateway pure logic: tokens, request bodies, idempotency keys, ids and SSE pushes."""

from __future__ import annotations

import hmac
import time
import uuid
from datetime import UTC, datetime

import jwt
import msgspec
import pytest

from services.gateway import auth
from services.gateway import core as gw
from services.gateway.core import ApiError, ChatRequest, Principal
from shared import messages as m
from shared.messages import encode

SECRET = "unit-test-secret-" + "x" * 48
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def bearer(secret: str = SECRET, algorithm: str = "HS256", **claims: object) -> str:
    base: dict[str, object] = {"sub": "alice", "project": "acme", "exp": time.time() + 600}
    base.update(claims)
    payload = {k: v for k, v in base.items() if v is not None}
    return "Bearer " + jwt.encode(payload, secret, algorithm=algorithm)


BAD_HEADERS = {
    "missing header": None, "empty header": "", "not bearer": "Basic YWxpY2U6cHc=",
    "bearer without token": "Bearer", "garbage token": "Bearer not-a-jwt",
    "bad signature": bearer(secret="another-secret-" + "y" * 48),
    "expired": bearer(exp=time.time() - 60), "missing exp": bearer(exp=None),
    "missing sub": bearer(sub=None), "missing project": bearer(project=None),
    "integer sub": bearer(sub=42), "integer project": bearer(project=42),
    "list project": bearer(project=["acme"]), "dot in project": bearer(project="a.b"),
    "star project": bearer(project="*"), "gt sub": bearer(sub=">"),
    "space in sub": bearer(sub="al ice"), "empty sub": bearer(sub=""),
    "65 char project": bearer(project="p" * 65), "other algorithm": bearer(algorithm="HS384"),
}  # fmt: skip


@pytest.mark.parametrize("header", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_authenticate_rejects_bad_credentials_with_401(header: str | None) -> None:
    with pytest.raises(ApiError) as info:
        auth.authenticate(header, SECRET)
    assert (info.value.status, info.value.code) == (401, "unauthenticated")


def test_authenticate_rejects_a_claim_with_a_trailing_newline() -> None:
    with pytest.raises(ApiError):
        auth.authenticate(bearer(project="acme\n"), SECRET)


@pytest.mark.parametrize("user", ["alice", "A-b_9", "u" * 64])
def test_authenticate_returns_the_principal_of_a_good_token(user: str) -> None:
    assert auth.authenticate(bearer(sub=user), SECRET) == Principal(project="acme", user=user)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"", 400, "invalid_body"), (b"  \n\t", 400, "invalid_body"),
        (b"{", 400, "invalid_json"), (b"[]", 400, "invalid_body"),
        (b'"hello"', 400, "invalid_body"), (b"{}", 400, "invalid_body"),
        (b'{"content": 5}', 400, "invalid_body"),
        (b'{"content": "hi", "conversation_id": 7}', 400, "invalid_body"),
        (b'{"content": "hi", "role": "system"}', 400, "invalid_body"),
        (b'{"content": ""}', 422, "empty_content"),
        (b'{"content": " \\n\\t "}', 422, "empty_content"),
        (b'{"content": "' + b"x" * 11 + b'"}', 413, "content_too_large"),
        (b'{"content": "a\\u0000b"}', 422, "invalid_content"),
        (b'{"content": "hi", "conversation_id": "nope"}', 400, "invalid_id"),
        (b'{"content": "hi", "conversation_id": ""}', 400, "invalid_id"),
        # Only the 36-character form the API document names (format uuid): no braces, no urn:,
        # no bare hex, though uuid.UUID takes them.
        (b'{"content": "hi", "conversation_id": "{6f9619ff-8b86-d011-b42d-00c04fc964ff}"}', 400, "invalid_id"),
        (b'{"content": "hi", "conversation_id": "6f9619ff8b86d011b42d00c04fc964ff"}', 400, "invalid_id"),
        (b'{"content": "hi", "conversation_id": "urn:uuid:6f9619ff-8b86-d011-b42d-00c04fc964ff"}', 400, "invalid_id"),
        (b'{"content": "hi", "conversation_id": "6f9619ff-8b86-d011-b42d-00c04fc964ff\\n"}', 400, "invalid_id"),
    ],
)  # fmt: skip
def test_parse_chat_rejects_bad_bodies_with_a_clear_status(
    body: bytes, status: int, code: str
) -> None:
    with pytest.raises(ApiError) as info:
        gw.parse_chat(body, max_chars=10)
    assert (info.value.status, info.value.code) == (status, code)


CONV = "6f9619ff-8b86-d011-b42d-00c04fc964ff"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"content": "0123456789"}', ChatRequest(content="0123456789")),
        (b'{"content": "hi", "conversation_id": null}', ChatRequest(content="hi")),
        (f'{{"content": "hi", "conversation_id": "{CONV.upper()}"}}'.encode(),
         ChatRequest(content="hi", conversation_id=CONV)),
    ],
)  # fmt: skip
def test_parse_chat_accepts_good_bodies_and_normalises_the_uuid(
    body: bytes, expected: ChatRequest
) -> None:
    assert gw.parse_chat(body, max_chars=10) == expected


@pytest.mark.parametrize("key", ["", "k" * 256, "a\nb", "a\x00", "tab\there", "\x7f"])
def test_check_idempotency_key_rejects_bad_keys_with_400(key: str) -> None:
    with pytest.raises(ApiError) as info:
        gw.check_idempotency_key(key, 255)
    assert (info.value.status, info.value.code) == (400, "invalid_idempotency_key")


@pytest.mark.parametrize("key", [None, "k", "k" * 255, "order-42-retry"])
def test_check_idempotency_key_passes_good_keys_through(key: str | None) -> None:
    assert gw.check_idempotency_key(key, 255) == key


ALICE = Principal(project="acme", user="alice")
KEY = gw.id_key("jwt-secret")


def test_ids_for_is_deterministic_per_project_user_and_key() -> None:
    assert gw.ids_for(ALICE, "k1", None, KEY) == gw.ids_for(
        Principal("acme", "alice"), "k1", None, gw.id_key("jwt-secret")
    )


@pytest.mark.parametrize(
    ("principal", "key"),
    [(Principal("acme", "bob"), "k1"), (Principal("other", "alice"), "k1"), (ALICE, "k2")],
)
def test_ids_for_differs_across_users_projects_and_keys(principal: Principal, key: str) -> None:
    mine, theirs = gw.ids_for(ALICE, "k1", None, KEY), gw.ids_for(principal, key, None, KEY)
    assert mine[0] != theirs[0] and mine[1] != theirs[1]


def test_ids_for_with_a_key_keeps_a_given_conversation_and_the_message_id() -> None:
    assert gw.ids_for(ALICE, "k1", CONV, KEY) == (gw.ids_for(ALICE, "k1", None, KEY)[0], CONV)


def test_ids_for_without_a_key_is_random_but_keeps_a_given_conversation() -> None:
    first, second = gw.ids_for(ALICE, None, None, KEY), gw.ids_for(ALICE, None, None, KEY)
    assert first[0] != second[0] and first[1] != second[1]
    assert all(uuid.UUID(x) for x in (*first, *second))
    assert gw.ids_for(ALICE, None, CONV, KEY)[1] == CONV


def test_random_uuids_are_version_4_uuids_in_canonical_form_and_all_distinct() -> None:
    seen = set()
    for _ in range(2000):
        for value in gw.random_uuids():
            parsed = uuid.UUID(value)
            assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
            assert str(parsed) == value
            seen.add(value)
    assert len(seen) == 4000


def test_keyed_ids_are_an_hmac_of_project_user_and_key_as_version_8_uuids() -> None:
    digest = hmac.digest(KEY, b"acme\nalice\nretry-me", "sha256")
    message_id, conversation_id = gw.ids_for(ALICE, "retry-me", None, KEY)
    for value, raw in ((message_id, digest[:16]), (conversation_id, digest[16:])):
        parsed = uuid.UUID(value)
        assert (parsed.version, parsed.variant, str(parsed)) == (8, uuid.RFC_4122, value)
        # 122 bits of the MAC survive: all but the version and variant bits.
        mask = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
        assert parsed.int & mask == int.from_bytes(raw) & mask


def test_keyed_ids_cannot_be_computed_without_the_secret() -> None:
    # The derivation before issue 12: uuid5 of public namespaces over project, user and key.
    scope = "acme\nalice\nretry-me"
    public = (
        str(uuid.uuid5(uuid.UUID("5d1c9a3e-7f0b-4c52-9d7e-3b8f6a2e4c91"), scope)),
        str(uuid.uuid5(uuid.UUID("a8e2f1c4-3b6d-4e9a-8c7f-1d5b2e9a6f03"), scope)),
    )
    mine = gw.ids_for(ALICE, "retry-me", None, KEY)
    other_secret = gw.ids_for(ALICE, "retry-me", None, gw.id_key("another-jwt-secret"))
    assert not set(mine) & set(public)
    assert not set(mine) & set(other_secret)


def test_the_id_key_is_the_configured_secret_else_derived_from_the_jwt_secret() -> None:
    assert gw.id_key("jwt", "configured") == b"configured"
    derived = gw.id_key("jwt")
    assert derived == gw.id_key("jwt", "") and derived != b"jwt" and len(derived) == 32
    assert gw.id_key("jwt2") != derived


def test_content_hash_is_a_stable_sha256_hex() -> None:
    h = gw.content_hash("c", "hello")
    assert h == gw.content_hash("c", "hello") and len(h) == 64 and int(h, 16) >= 0


@pytest.mark.parametrize(
    ("a", "b"), [(("c1", "x"), ("c2", "x")), (("c", "x"), ("c", "y")), ((None, "x"), ("c", "x"))]
)
def test_content_hash_differs_by_conversation_or_content(a: tuple, b: tuple) -> None:
    assert gw.content_hash(*a) != gw.content_hash(*b)


IDS = {"message_id": "m1", "conversation_id": "c1", "project_id": "acme"}
DELTA = m.TokenDelta(conversation_id="c1", run_id="r1", attempt=2, seq=7, text="Hel")
USER = m.UserMessagePersisted(
    event_id="e", **IDS, user_id="alice", content="hi", content_hash="h", created_at=NOW
)
ASSISTANT = m.AssistantMessagePersisted(
    event_id="e", **{**IDS, "message_id": "a1"}, run_id="r1", reply_to="m1", kind="answer",
    content="Hello", created_at=NOW, status="completed",
)  # fmt: skip
VERDICT = m.RunVerdict(
    event_id="e", **IDS, run_id="r1", user_id="alice", verdict="approve", status="running",
    reason="ok", model="claude-haiku-4-5", attempt=1,
)  # fmt: skip


@pytest.mark.parametrize(
    ("subject", "event", "name", "event_id", "payload"),
    [
        ("chat.stream.acme.c1", DELTA, "token", "tok:r1:2:7",
         {"run_id": "r1", "attempt": 2, "seq": 7, "text": "Hel"}),
        ("chat.persisted.user.acme.c1", USER, "message.created", "msg:m1",
         {"id": "m1", "conversation_id": "c1", "role": "user", "content": "hi",
          "created_at": NOW.isoformat()}),
        ("chat.persisted.assistant.acme.c1", ASSISTANT, "message.completed", "msg:a1",
         {"id": "a1", "conversation_id": "c1", "run_id": "r1", "role": "assistant",
          "kind": "answer", "status": "completed", "content": "Hello",
          "created_at": NOW.isoformat()}),
        ("policy.verdict.acme.c1", VERDICT, "run.status", "run:r1:1:running",
         {"run_id": "r1", "message_id": "m1", "status": "running", "verdict": "approve",
          "reason": "ok", "attempt": 1, "model": "claude-haiku-4-5"}),
    ],
)  # fmt: skip
def test_push_event_maps_each_subject_family_to_its_sse_event(
    subject: str, event: object, name: str, event_id: str, payload: dict
) -> None:
    assert gw.push_event(subject, encode(event)) == (name, event_id, payload)


@pytest.mark.parametrize(
    "subject", ["policy.reply.acme.c1", "exec.task.acme.c1", "chat.in.acme.c1", "dlq.X.y"]
)
def test_push_event_returns_none_for_subjects_clients_never_see(subject: str) -> None:
    assert gw.push_event(subject, encode(VERDICT)) is None


def test_a_failure_notice_ends_the_run_with_run_failed_instead_of_message_completed() -> None:
    failure = msgspec.structs.replace(ASSISTANT, kind="failure", status="failed")
    name, _, payload = gw.push_event("chat.persisted.assistant.acme.c1", encode(failure))
    assert (name, payload["kind"], payload["status"]) == ("run.failed", "failure", "failed")


MID = "0b7f3c56-5d8e-4c7e-9a59-6a1f2c9e7d10"


@pytest.mark.parametrize(
    ("cid", "rid"),
    [("nope", f"run-{MID}"), (MID, "run-"), (MID, MID), (MID, f"run-{MID}x"),
     (MID, f"run-{MID}.>"), (MID, "run-*"), (MID, f"RUN-{MID}"), (MID, "run-" + "a" * 300),
     (MID, f"run-{MID.upper()}"), ("", f"run-{MID}"), (MID, f"run-{MID}\n")],
)  # fmt: skip
def test_parse_cancel_ids_refuses_malformed_ids_with_400(cid: str, rid: str) -> None:
    with pytest.raises(ApiError) as err:
        gw.parse_cancel_ids(cid, rid)
    assert (err.value.status, err.value.code) == (400, "invalid_id")


def test_parse_cancel_ids_names_the_runs_message() -> None:
    cid = str(uuid.uuid4())
    assert gw.parse_cancel_ids(cid.upper(), f"run-{MID}") == (cid, f"run-{MID}", MID)


# ---- who may watch, read and post (I9) -------------------------------------------------------

BOB = Principal(project="acme", user="bob")
OUTSIDER = Principal(project="other", user="alice")
ACCESS = [
    # (ownership, may_watch, may_read, may_post): True/False = allowed (watch: owned/pending)
    (gw.Ownership(ALICE), True, None, None),
    (gw.Ownership(BOB), 404, 404, 404),
    (gw.Ownership(OUTSIDER), 404, 404, 404),
    (gw.Ownership(None), False, 404, None),
    (gw.Ownership(None, known=False), 503, 503, 503),
]


@pytest.mark.parametrize(("ownership", "watch", "read", "post"), ACCESS)
def test_access_to_a_conversation_follows_its_owner_and_never_allows_on_a_failed_read(
    ownership: gw.Ownership, watch: bool | int, read: int | None, post: int | None
) -> None:
    for check, expected in ((gw.may_watch, watch), (gw.may_read, read), (gw.may_post, post)):
        if isinstance(expected, bool) or expected is None:
            assert check(ownership, ALICE) == expected  # type: ignore[operator]
            continue
        with pytest.raises(ApiError) as info:
            check(ownership, ALICE)  # type: ignore[operator]
        assert info.value.status == expected
        if expected == 503:
            assert info.value.headers["Retry-After"] == "1"
