"""The NATS permission table: what each service user may publish and subscribe to."""

from __future__ import annotations

from pathlib import Path

from baton import permissions, roles
from shared import subjects

READ_ONLY_API = (
    "$JS.API.CONSUMER.MSG.NEXT.",
    "$JS.API.CONSUMER.INFO.",
    "$JS.API.STREAM.INFO.",
    "$JS.API.STREAM.MSG.GET.",
    "$JS.API.DIRECT.GET.",
)


def test_only_policy_may_publish_executor_tasks() -> None:
    task = subjects.exec_task("*", "*")
    for service in permissions.SERVICES:
        publish = permissions.permissions(service)["publish"]
        if service == "policy":
            assert task in publish["allow"] and "exec.task.>" not in publish["deny"]
        else:
            assert task not in publish["allow"] and "exec.task.>" in publish["deny"]


def test_only_policy_may_publish_tool_tasks_and_only_the_gateway_approvals() -> None:
    task, approval = subjects.tool_task("*", "*"), subjects.tool_approval("*", "*")
    for service in permissions.SERVICES:
        publish = permissions.permissions(service)["publish"]
        if service == "policy":
            assert task in publish["allow"] and "tool.task.>" not in publish["deny"]
        else:
            assert task not in publish["allow"] and "tool.task.>" in publish["deny"]
        assert (approval in publish["allow"]) == (service == "gateway")


def test_the_executor_dials_only_the_mcp_servers_it_is_given() -> None:
    import pytest

    from services.executor import config
    from shared.errors import ConfigError

    assert config.from_env_map({}).mcp_server_map() == {}
    env = {"EXECUTOR_MCP_SERVERS": '{"demo": "http://127.0.0.1:1/mcp", "local": ["srv", "-x"]}'}
    assert config.from_env_map(env).mcp_server_map() == {
        "demo": "http://127.0.0.1:1/mcp",
        "local": ["srv", "-x"],
    }
    with pytest.raises(ConfigError):
        config.from_env_map({"EXECUTOR_MCP_SERVERS": '["not", "a", "map"]'}).mcp_server_map()


def test_only_policy_may_abort_calls_and_executors_only_read_the_abort_marks() -> None:
    abort = subjects.exec_abort("*", "*")
    for service in permissions.SERVICES:
        publish = permissions.permissions(service)["publish"]
        if service == "policy":
            assert abort in publish["allow"] and "exec.abort.>" not in publish["deny"]
            assert f"$KV.{subjects.BUCKET_ABORTS}.>" in publish["allow"]
        else:
            assert abort not in publish["allow"] and "exec.abort.>" in publish["deny"]
            assert not any(s.startswith(f"$KV.{subjects.BUCKET_ABORTS}") for s in publish["allow"])
    executor = permissions.permissions("executor")["publish"]["allow"]
    assert f"$JS.API.DIRECT.GET.KV_{subjects.BUCKET_ABORTS}.>" in executor


def test_only_the_gateway_asks_for_cancels() -> None:
    cancel = subjects.chat_cancel("*", "*")
    allowed = [
        s for s in permissions.SERVICES if cancel in permissions.permissions(s)["publish"]["allow"]
    ]
    assert allowed == ["gateway"]


PURGE_ALL = "$JS.API.STREAM.PURGE.>"


def test_no_service_may_manage_streams_or_consumers() -> None:
    for service in permissions.SERVICES:
        publish = permissions.permissions(service)["publish"]
        assert set(permissions.ADMIN_ONLY) - {PURGE_ALL} <= set(publish["deny"])
        api = [s for s in publish["allow"] if s.startswith("$JS.API.")]
        purges = [s for s in api if s.startswith("$JS.API.STREAM.PURGE.")]
        # Only reads and fetches: no create, update, delete of anything; purges below.
        assert all(s.startswith(READ_ONLY_API) for s in set(api) - set(purges)), api
        if service != "persister":
            assert purges == [] and PURGE_ALL in publish["deny"], service


def test_only_the_persister_may_purge_and_only_the_streams_holding_content() -> None:
    publish = permissions.permissions("persister")["publish"]
    purges = {s for s in publish["allow"] if s.startswith("$JS.API.STREAM.PURGE.")}
    assert purges == {f"$JS.API.STREAM.PURGE.{s}" for s in subjects.CONTENT_STREAMS}
    # A deny wins over an allow: the blanket deny is gone, every other stream's purge denied.
    assert PURGE_ALL not in publish["deny"]
    others = {s.name for s in subjects.STREAMS} - set(subjects.CONTENT_STREAMS)
    assert others and {f"$JS.API.STREAM.PURGE.{s}" for s in others} <= set(publish["deny"])


def test_each_service_binds_only_its_own_durables_and_reads_only_its_inbox() -> None:
    executor = permissions.permissions("executor")
    # Its inbox, and the aborts policy sends to every executor replica.
    assert executor["subscribe"]["allow"] == [subjects.EXEC_ABORT_ALL, "_INBOX_executor.>"]
    assert "$JS.API.CONSUMER.MSG.NEXT.EXEC_TASKS.executor" in executor["publish"]["allow"]
    assert not any("persister" in s for s in executor["publish"]["allow"])
    gateway = permissions.permissions("gateway")
    assert set(subjects.PUSH_SUBJECTS) < set(gateway["subscribe"]["allow"])
    # The deletion tombstones: they end a deleted conversation's open streams.
    assert subjects.conversation_delete("*", "*") in gateway["subscribe"]["allow"]
    assert "$JS.API.STREAM.MSG.GET.CHAT_IN" in gateway["publish"]["allow"]


def test_the_authorization_block_names_every_user_and_passwords_persist(tmp_path: Path) -> None:
    first = permissions.passwords_for(tmp_path)
    assert permissions.passwords_for(tmp_path) == first
    assert (tmp_path / permissions.PASSWORDS_FILE).stat().st_mode & 0o077 == 0
    block = permissions.authorization(first)
    for user in (permissions.ADMIN, *permissions.SERVICES):
        assert f'"user": "{user}"' in block and first[user] in block


def test_role_dsn_swaps_only_the_user() -> None:
    dsn = "postgresql://postgres@127.0.0.1:5432/baton"
    assert roles.dsn_for(dsn, "gateway") == "postgresql://baton_gateway@127.0.0.1:5432/baton"
