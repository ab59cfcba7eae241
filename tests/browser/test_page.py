"""baton's chat page in a real headless Chromium against the five services (issue 18)."""

from __future__ import annotations

import signal
from typing import Any

import httpx
import pytest

from tests.browser.conftest import Page
from tests.e2e.conftest import Pipeline, start_services

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def stored(p: Pipeline, token: str, cid: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{p.gateway}/api/conversations/{cid}/messages",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    r.raise_for_status()
    messages: list[dict[str, Any]] = r.json()["messages"]
    return messages


def conversation_of(page: Page) -> str:
    cid: str = page.wait(
        "the page to open the new conversation",
        lambda: page.js("const m = /c=([0-9a-f-]+)/.exec(location.hash); return m && m[1]"),
    )
    return cid


def answered(page: Page) -> dict[str, str] | None:
    """The stored answer once the page shows it (not a bubble still streaming)."""
    done = [
        b for b in page.bubbles() if b["role"] == "assistant" and not b["id"].startswith("run-")
    ]
    return done[-1] if done else None


def streaming(page: Page, words: int) -> bool:
    live = [b for b in page.bubbles() if b["id"].startswith("run-")]
    return bool(live) and len(live[-1]["text"].split()) >= words


def send(page: Page, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = page.driver.find_element(By.ID, "content")
    box.click()
    box.send_keys(text)
    box.send_keys(Keys.ENTER)  # keyboard sending: Enter sends


def test_a_conversation_streams_then_survives_a_reload(pipeline: Pipeline, page: Page) -> None:
    pipeline.model.update_settings(style="readable", tokens_per_second=30, words_per_reply=40)
    token = pipeline.token("acme", "alice")
    page.open(token)
    page.wait("sign-in", lambda: page.text("who") == "Signed in.")
    send(page, "What can you do? Explain.")
    cid = conversation_of(page)
    page.wait("the answer streaming word by word", lambda: streaming(page, 3))
    final = page.wait("the stored answer", lambda: answered(page))
    assert final["text"].startswith("Hello! I am baton's offline model")
    assert final["streamed"] == final["text"]  # every token once, in order, none missing
    assert page.text("status") == "Answered."
    history = [(m["role"], m["content"]) for m in stored(pipeline, token, cid)]
    assert history == [("user", "What can you do? Explain."), ("assistant", final["text"])]
    assert page.js("return document.getElementById('content').value") == ""

    page.driver.refresh()
    page.wait(
        "the history after a reload",
        lambda: [(b["role"], b["text"]) for b in page.bubbles()] == history,
    )
    # The conversation is listed, and the page works at phone width.
    page.wait(
        "the conversation list",
        lambda: page.js("return document.querySelectorAll('#conversations li').length") == 1,
    )
    page.driver.set_window_size(390, 844)
    width = page.js("return document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways at phone width: {width}px"


def test_a_gateway_restart_mid_answer_ends_with_exactly_the_stored_text(
    pipeline: Pipeline, page: Page
) -> None:
    pipeline.model.update_settings(tokens_per_second=12, words_per_reply=90)
    token = pipeline.token("acme", "bob")
    page.open(token)
    page.wait("sign-in", lambda: page.text("who") == "Signed in.")
    send(page, "Tell me a long story")
    cid = conversation_of(page)
    page.wait("the answer streaming", lambda: streaming(page, 8))
    page.screenshot("streaming")
    gateway = pipeline.child("gateway")
    gateway.signal(signal.SIGTERM)
    assert gateway.wait(30), "the gateway did not stop"
    before = [b for b in page.bubbles() if b["id"].startswith("run-")][-1]["text"]
    start_services([gateway], 60)  # same port: the browser's EventSource reconnects by itself
    final = page.wait("the stored answer after the restart", lambda: answered(page), timeout=90)
    [_, answer] = stored(pipeline, token, cid)
    assert final["text"] == answer["content"]
    assert final["streamed"] == answer["content"]  # the resumed stream: no gap, no repeat
    assert answer["content"].startswith(before)
    assert len(before.split()) < 90  # the cut really was mid-answer


def test_a_double_click_on_send_makes_one_message(pipeline: Pipeline, page: Page) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    token = pipeline.token("acme", "carol")
    page.open(token)
    page.wait("sign-in", lambda: page.text("who") == "Signed in.")
    page.driver.find_element(By.ID, "content").send_keys("Only once, please")
    ActionChains(page.driver).double_click(page.driver.find_element(By.ID, "send")).perform()
    cid = conversation_of(page)
    page.wait("the stored answer", lambda: answered(page))
    users = [m for m in stored(pipeline, token, cid) if m["role"] == "user"]
    assert [m["content"] for m in users] == ["Only once, please"]
    assert [b["role"] for b in page.bubbles()] == ["user", "assistant"]


def test_cancel_stops_the_answer_and_says_so(pipeline: Pipeline, page: Page) -> None:
    from selenium.webdriver.common.by import By

    pipeline.model.update_settings(tokens_per_second=4, words_per_reply=400)
    token = pipeline.token("acme", "dave")
    page.open(token)
    page.wait("sign-in", lambda: page.text("who") == "Signed in.")
    send(page, "Talk for a long time")
    cid = conversation_of(page)
    page.wait("the answer streaming", lambda: streaming(page, 2))
    page.driver.find_element(By.ID, "cancel").click()
    page.wait("the cancelled status", lambda: page.text("status").startswith("Cancelled"))
    assert page.js("return document.getElementById('cancel').disabled") is True

    def statuses() -> list[str]:
        state = httpx.get(
            f"{pipeline.gateway}/api/conversations/{cid}/state",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        ).json()
        return [r["status"] for r in state["runs"]]

    # The page shows the live verdict; the stored run follows once the persister has it.
    page.wait("the stored cancelled run", lambda: statuses() != ["running"])
    assert statuses() == ["cancelled"]
    partial = [b for b in page.bubbles() if b["role"] == "assistant"]
    assert len(partial) == 1 and 0 < len(partial[0]["text"].split()) < 400


def test_a_bad_token_shows_a_clear_error(pipeline: Pipeline, page: Page) -> None:
    from selenium.webdriver.common.by import By

    page.open("not-a-token")
    error = page.wait("the error", lambda: page.text("error") or None)
    assert "token was refused (401" in error and "paste a valid token" in error
    assert page.js("return document.getElementById('error').hidden") is False
    page.screenshot("refused")
    # Sending without a valid token says so too, and sends nothing.
    page.driver.find_element(By.ID, "content").send_keys("hello")
    page.driver.find_element(By.ID, "send").click()
    page.wait("the send error", lambda: "Not sent" in page.text("error"))
    # A valid token pasted afterwards works.
    field = page.driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(pipeline.token("acme", "erin"))
    page.driver.find_element(By.CSS_SELECTOR, "#login button").click()
    page.wait("sign-in", lambda: page.text("who") == "Signed in.")
    assert page.js("return document.getElementById('error').hidden") is True


def test_a_page_opened_mid_answer_shows_all_of_it(pipeline: Pipeline, page: Page) -> None:
    """The words streamed before the page opened are replayed, then the rest live."""
    pipeline.model.update_settings(tokens_per_second=15, words_per_reply=60)
    token = pipeline.token("acme", "fred")
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=pipeline.gateway, headers=auth, timeout=30) as h:
        r = h.post("/api/chat", json={"content": "Stream before I look"})
        assert r.status_code == 202
        cid = r.json()["message"]["conversation_id"]
        url = f"/api/conversations/{cid}/events"
        with h.stream("GET", url, params={"last_event_id": "all"}) as events:
            tokens = 0
            for line in events.iter_lines():
                tokens += line == "event: token"
                if tokens == 5:
                    break  # the answer is well under way
    page.open(token, cid)
    final = page.wait("the stored answer", lambda: answered(page))
    [_, answer] = stored(pipeline, token, cid)
    assert final["text"] == answer["content"]
    assert final["streamed"] == answer["content"]  # the first words too, none twice
