"""The NATS accounts: each service reaches the streams only through what it may publish."""

from __future__ import annotations

from baton import accounts, permissions
from shared import subjects, wiring

PASSWORDS = {u: f"pw-{u}" for u in (permissions.ADMIN, *permissions.SERVICES)}


def test_the_streams_and_the_admin_live_in_one_account_each_service_in_its_own() -> None:
    config = accounts.accounts_config(PASSWORDS)
    assert set(config) == {accounts.STREAMS_ACCOUNT, *map(accounts.account, permissions.SERVICES)}
    streams = config[accounts.STREAMS_ACCOUNT]
    assert streams["jetstream"] == "enabled"
    assert [u["user"] for u in streams["users"]] == [permissions.ADMIN]
    for service in permissions.SERVICES:
        own = config[accounts.account(service)]
        assert "jetstream" not in own  # its JetStream API is the streams' account's, imported
        [user] = own["users"]
        assert user["user"] == service and user["permissions"] == permissions.permissions(service)


def test_a_service_imports_exactly_its_publish_allow_list_from_the_streams_account() -> None:
    config = accounts.accounts_config(PASSWORDS)
    for service in permissions.SERVICES:
        imported = {
            i["service"]["subject"]
            for i in config[accounts.account(service)]["imports"]
            if "service" in i
        }
        allowed = set(permissions.permissions(service)["publish"]["allow"])
        assert imported == allowed | {accounts.JS_ACCOUNT_INFO}
    # The streams' account lets only policy's account send executor tasks and aborts.
    exports = {e["service"]: e for e in config[accounts.STREAMS_ACCOUNT]["exports"]}
    assert exports[subjects.exec_task("*", "*")]["accounts"] == ["POLICY"]
    assert exports[subjects.exec_abort("*", "*")]["accounts"] == ["POLICY"]
    pull = f"$JS.API.CONSUMER.MSG.NEXT.{subjects.STREAM_TASKS}.{wiring.EXECUTOR_TASKS.durable}"
    assert exports[pull] == {"service": pull, "accounts": ["EXECUTOR"], "response_type": "stream"}


def test_listeners_hear_the_publishers_accounts_directly() -> None:
    config = accounts.accounts_config(PASSWORDS)
    gateway = {
        (i["stream"]["account"], i["stream"]["subject"])
        for i in config["GATEWAY"]["imports"]
        if "stream" in i
    }
    assert gateway == {
        ("PERSISTER", subjects.persisted_user("*", "*")),
        ("PERSISTER", subjects.persisted_assistant("*", "*")),
        ("PERSISTER", subjects.persisted_tool_turn("*", "*")),
        ("PERSISTER", subjects.persisted_tool_result("*", "*")),
        ("EXECUTOR", subjects.token_stream("*", "*")),
        ("POLICY", subjects.policy_verdict("*", "*")),
        ("POLICY", subjects.tool_requested("*", "*")),  # calls waiting for the user
        # Deletion tombstones end open streams: the retention sweep's (the gateway's own
        # reach it inside its account).
        ("PERSISTER", subjects.conversation_delete("*", "*")),
    }
    policy_exports = {e["stream"]: e["accounts"] for e in config["POLICY"]["exports"]}
    assert policy_exports[subjects.exec_abort("*", "*")] == ["EXECUTOR"]
