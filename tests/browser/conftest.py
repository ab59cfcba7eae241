"""The chat page in Debian's headless Chromium (Selenium + /usr/bin/chromedriver, no download).

``make browser-tools`` installs ``chromium`` and ``chromium-driver`` with apt where it can; the
tests skip, saying so, only when no Chromium can be had. Every test saves a screenshot under
``tmp/artifacts/browser`` (``BATON_ARTIFACTS`` moves it) and prints its path; a failing test also
saves the page's console log there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from baton.embedded import PostgresServer
from tests.conftest import ExternalPostgres
from tests.e2e.conftest import Pipeline, fresh, module_stack

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER = "/usr/bin/chromedriver"
NO_CHROMIUM = (
    "no Chromium: `make browser-tools` installs Debian's chromium and chromium-driver "
    "(it needs root and apt-get)"
)


def chromium() -> tuple[str, str] | None:
    """(browser, driver) paths from Debian's packages, or None when they are not installed."""
    browser = next((b for b in CHROMIUM if os.access(b, os.X_OK)), None) or shutil.which("chromium")
    driver = DRIVER if os.access(DRIVER, os.X_OK) else shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def artifacts() -> Path:
    base = Path(os.environ.get("BATON_ARTIFACTS", ROOT / "tmp" / "artifacts"))
    out = base / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def _browser_stack(
    postgres_server: PostgresServer | ExternalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    yield from module_stack(postgres_server, tmp_path_factory.mktemp("browser"))


@pytest.fixture
def pipeline(_browser_stack: Pipeline) -> Pipeline:
    return fresh(_browser_stack)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


class Page:
    """One browser window on the gateway's page, with the waits the tests need."""

    def __init__(self, driver: Any, base: str, name: str) -> None:
        self.driver = driver
        self.base = base
        self.name = name

    def screenshot(self, label: str) -> Path:
        """A screenshot of the page now, beside the one taken at the test's end."""
        shot = artifacts() / f"{self.name}.{label}.png"
        self.driver.save_screenshot(str(shot))
        print(f"\nscreenshot: {shot}")
        return shot

    def open(self, token: str, conversation: str | None = None) -> None:
        fragment = f"#token={token}" + (f"&c={conversation}" if conversation else "")
        self.driver.get(f"{self.base}/{fragment}")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _: check())
        except TimeoutException:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None

    def bubbles(self) -> list[dict[str, str]]:
        """The messages on screen: id (without "m-"), role, text, and the streamed text."""
        result: list[dict[str, str]] = self.js(
            """return [...document.querySelectorAll('#messages li')].map(li => ({
                 id: li.id.slice(2), role: li.dataset.role,
                 text: li.querySelector('.text').textContent,
                 streamed: li.dataset.streamed || ''}))"""
        )
        return result

    def text(self, element_id: str) -> str:
        value: str = self.js("return document.getElementById(arguments[0]).textContent", element_id)
        return value


@pytest.fixture
def page(request: pytest.FixtureRequest, pipeline: Pipeline) -> Iterator[Page]:
    found = chromium()
    if found is None:
        pytest.skip(NO_CHROMIUM)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1100,800")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = artifacts() / f"{_slug(request.node.name)}.chromedriver.log"
    driver = webdriver.Chrome(options=options, service=Service(driver_path, log_output=str(log)))
    try:
        yield Page(driver, pipeline.gateway, _slug(request.node.name))
    finally:
        name = _slug(request.node.name)
        shot = artifacts() / f"{name}.png"
        try:
            driver.save_screenshot(str(shot))
            print(f"\nscreenshot: {shot}")
            failed = getattr(request.node, "rep_call", None)
            if failed is not None and failed.failed:
                console = artifacts() / f"{name}.console.json"
                console.write_text(json.dumps(driver.get_log("browser"), indent=2))
                print(f"console log: {console}")
        finally:
            driver.quit()
        log.unlink(missing_ok=True)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:120]
