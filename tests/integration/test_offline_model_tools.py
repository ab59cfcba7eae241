"""The offline model calls offered tools when a message asks for them, and answers with the
tool's result after tool_result blocks, in the real wire format (read by the real SDK)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import pytest
from anthropic.types import MessageParam, ToolParam

from baton.offline_model import ModelSettings, OfflineModelProcess

MODEL = "claude-offline-test"
TOOLS: list[ToolParam] = [
    {
        "name": "create_task",
        "description": "Create a task.",
        "input_schema": {
            "type": "object",
            "properties": {"title": {"type": "string"}},
            "required": ["title"],
        },
    },
    {"name": "current_time", "description": "Now.", "input_schema": {"type": "object"}},
    {"name": "calculator", "description": "Math.", "input_schema": {"type": "object"}},
]


@pytest.fixture(scope="module")
def model() -> Iterator[OfflineModelProcess]:
    with OfflineModelProcess(ModelSettings(style="hostile")) as process:
        yield process


@pytest.fixture
async def client(model: OfflineModelProcess) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = anthropic.AsyncAnthropic(base_url=model.url, api_key="test", max_retries=0)
    yield sdk
    await sdk.close()


def _user(text: str) -> list[MessageParam]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    ("text", "name", "args"),
    [
        ("Please remind me to call John tomorrow.", "create_task", {"title": "call John tomorrow"}),
        ("What time is it in Berlin?", "current_time", {"timezone": "UTC"}),
        ("How much is (12 + 30) * 2?", "calculator", {"expression": "(12 + 30) * 2"}),
    ],
)
async def test_a_message_that_asks_for_an_offered_tool_gets_a_streamed_tool_use(
    client: anthropic.AsyncAnthropic, text: str, name: str, args: dict[str, Any]
) -> None:
    async with client.messages.stream(
        model=MODEL, max_tokens=256, messages=_user(text), tools=TOOLS
    ) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    [block] = final.content
    assert block.type == "tool_use" and block.id.startswith("toolu_")
    assert (block.name, block.input) == (name, args)
    assert final.usage.output_tokens > 0


async def test_tool_use_ids_are_never_reused(client: anthropic.AsyncAnthropic) -> None:
    ids = set()
    for _ in range(3):
        reply = await client.messages.create(
            model=MODEL, max_tokens=64, messages=_user("remind me to stretch"), tools=TOOLS
        )
        assert reply.content[0].type == "tool_use"
        ids.add(reply.content[0].id)
    assert len(ids) == 3


@pytest.mark.parametrize(
    ("text", "tools", "choice"),
    [
        ("remind me to call John", [], None),  # not offered
        ("remind me to call John", TOOLS[1:], None),  # another tool is offered, not this one
        ("Tell me about rivers.", TOOLS, None),  # nothing asks for a tool
        ("remind me to call John", TOOLS, {"type": "none"}),
    ],
)
async def test_otherwise_the_answer_is_text(
    client: anthropic.AsyncAnthropic, text: str, tools: list[ToolParam], choice: Any
) -> None:
    extra: dict[str, Any] = {"tools": tools} if tools else {}
    if choice is not None:
        extra["tool_choice"] = choice
    reply = await client.messages.create(model=MODEL, max_tokens=64, messages=_user(text), **extra)
    assert reply.stop_reason == "end_turn" and reply.content[0].type == "text"


async def test_after_tool_results_the_model_answers_with_what_the_tool_said(
    client: anthropic.AsyncAnthropic,
) -> None:
    messages: list[MessageParam] = [
        {"role": "user", "content": "Please remind me to call John."},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "create_task",
                    "input": {"title": "call John"},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "created task_42"}
            ],
        },
    ]
    async with client.messages.stream(
        model=MODEL, max_tokens=256, messages=messages, tools=TOOLS
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert final.stop_reason == "end_turn"
    assert "created task_42" in text
    errored = [
        *messages[:2],
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": "boom",
                    "is_error": True,
                }
            ],
        },
    ]
    reply = await client.messages.create(model=MODEL, max_tokens=256, messages=errored, tools=TOOLS)
    assert reply.content[0].type == "text" and "(error) boom" in reply.content[0].text
