"""The console in a real browser: Debian's chromium, headless, driven through chromium-driver.

The console runs as ``hrflow-webhooks console`` (its own process, as the Procfile starts
it) over the suite's Redis; the state it shows is made by the real receiver and worker
against the sandbox. Clicks are a person's clicks: forms, buttons, links, no script.
"""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import pytest
from redis.asyncio import Redis
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from hrflow_webhooks.events import Event
from sandbox import HARRY_POTTER_KEY, JOHN_DOE_KEY, SAMPLE_SOURCE_KEY
from sandbox.faults import Fault
from tests.console_fixtures import (
    EDIT_TAGS,
    ConsoleProcess,
    browser_log_in,
    chromium,
    click_through,
    console_settings,
    deliver,
    edit_registry,
    seed_service,
)
from tests.polling import eventually, eventually_sync
from tests.redis_server import RedisServer
from tests.sandbox_fixtures import SandboxServer
from tests.service import drain, enqueue, make_settings, parsing_event


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    driver = chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def console(redis_server: RedisServer) -> Iterator[ConsoleProcess]:
    process = ConsoleProcess(make_settings(redis_server.url))
    yield process
    process.stop()


@pytest.fixture
def logged_in(browser: WebDriver, console: ConsoleProcess) -> WebDriver:
    browser.delete_all_cookies()
    browser_log_in(browser, console.url)
    return browser


def text_of(driver: WebDriver, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def test_without_the_token_the_browser_sees_the_login_page_and_no_data(
    browser: WebDriver, console: ConsoleProcess
) -> None:
    browser.delete_all_cookies()
    for path in ("/", "/events", "/dead-letters"):
        browser.get(console.url + path)
        assert browser.title.startswith("Log in")
        assert not browser.find_elements(By.ID, "queue-ready")
    browser_log_in(browser, console.url, token="not-the-token")
    assert "not the console" in text_of(browser, "[role=alert]")
    assert not browser.find_elements(By.ID, "queue-ready")


async def test_the_overview_shows_live_numbers_and_refreshes_itself(
    redis: Redis, redis_server: RedisServer, logged_in: WebDriver
) -> None:
    settings = make_settings(redis_server.url)
    await enqueue(settings, redis, *(parsing_event(f"pk-{n}") for n in range(3)))
    logged_in.refresh()
    assert logged_in.title.startswith("Overview")
    assert text_of(logged_in, "#queue-ready") == "3"
    assert logged_in.find_elements(By.CSS_SELECTOR, ".chart svg rect")  # 3 deliveries queued
    await enqueue(settings, redis, *(parsing_event(f"pk-more-{n}") for n in range(2)))
    # No reload from here: the page's own refresh brings the new number.
    # While the page reloads itself, the old document is gone and the new one not there yet.
    eventually_sync(
        lambda: text_of(logged_in, "#queue-ready") == "5",
        "the overview to refresh",
        ignoring=(NoSuchElementException, StaleElementReferenceException),
    )


async def test_a_search_by_profile_key_finds_its_event_and_timeline(
    redis: Redis,
    redis_server: RedisServer,
    sandbox: SandboxServer,
    http: aiohttp.ClientSession,
    logged_in: WebDriver,
) -> None:
    settings = console_settings(sandbox, redis_server.url)
    await seed_service(settings, sandbox, http)
    click_through(logged_in, By.LINK_TEXT, "Events")
    logged_in.find_element(By.NAME, "profile_key").send_keys(JOHN_DOE_KEY)
    click_through(logged_in, By.CSS_SELECTOR, "form.filters button")
    subjects = {cell.text for cell in logged_in.find_elements(By.CSS_SELECTOR, "table.log td.wrap")}
    assert subjects == {f"profile/{SAMPLE_SOURCE_KEY}/key:{JOHN_DOE_KEY}"}
    parsed = Event.from_payload(parsing_event(JOHN_DOE_KEY, SAMPLE_SOURCE_KEY))
    click_through(logged_in, By.CSS_SELECTOR, f"a[href='/events/{parsed.id}']")
    assert parsed.id in text_of(logged_in, "h1")
    rows = [
        (row.get_attribute("class"), text_of(row, ".outcome"))  # type: ignore[arg-type]
        for row in logged_in.find_elements(By.CSS_SELECTOR, "table.log tbody tr")
    ]
    assert rows[0] == ("k-delivery", "queued")
    assert ("k-handler", "ok") in rows
    assert rows[-1] == ("k-run", "done")


async def test_the_replay_button_turns_a_dead_letter_into_a_handled_event(
    redis: Redis,
    redis_server: RedisServer,
    sandbox: SandboxServer,
    http: aiohttp.ClientSession,
    logged_in: WebDriver,
) -> None:
    settings = console_settings(sandbox, redis_server.url)
    sandbox.state.faults.add(Fault(endpoint="PUT /v1/profile/indexing", status=400))
    await deliver(settings, http, parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    await drain(settings, edit_registry(settings))
    sandbox.state.faults.clear()  # HrFlow's side is fixed: time to replay

    click_through(logged_in, By.LINK_TEXT, "Dead letters")
    assert "1 matching" in text_of(logged_in, "main")
    click_through(logged_in, By.CSS_SELECTOR, "table.letters button.replay")
    assert "Replay queued" in text_of(logged_in, ".notice")  # on the event's timeline
    assert "replay" in [cell.text for cell in logged_in.find_elements(By.CSS_SELECTOR, "td")]

    await drain(settings, edit_registry(settings))
    puts = [call for call in sandbox.state.calls if call["method"] == "PUT"]
    assert [(put["status"], put["body"]["key"]) for put in puts] == [
        (400, HARRY_POTTER_KEY),
        (200, HARRY_POTTER_KEY),
    ]
    name, value = EDIT_TAGS.split("=")
    assert {"name": name, "value": value} in puts[-1]["body"]["tags"]

    async def handled() -> bool:
        logged_in.refresh()
        outcomes = [cell.text for cell in logged_in.find_elements(By.CSS_SELECTOR, ".outcome")]
        return outcomes[-2:] == ["ok", "done"]

    await eventually(handled, "the timeline to show the replayed run done")
    click_through(logged_in, By.LINK_TEXT, "Dead letters")
    assert "0 matching" in text_of(logged_in, "main")
