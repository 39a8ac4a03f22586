"""The operator console for tests: served by a real uvicorn (in the test's loop, or as the
``hrflow-webhooks console`` process), and a service state to look at, made the way the
service makes it: signed deliveries through the real receiver, a worker running the
built-in edit handler against the sandbox, a 400 from the sandbox for one profile.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

from control.console.access import COOKIE_NAME, CSRF_FIELD
from control.console.app import create_app
from hrflow_webhooks.settings import Settings
from sandbox import HARRY_POTTER_KEY, JOHN_DOE_KEY, SAMPLE_SOURCE_KEY
from sandbox.faults import Fault
from tests.polling import TIMEOUT_S, eventually_sync
from tests.processes import ROOT
from tests.redis_server import free_port
from tests.sandbox_fixtures import SandboxServer
from tests.service import LoopbackServer, drain, parsing_event, receiver, update_event
from workers.handlers import edit
from workers.registry import Registry

T = TypeVar("T")

CONSOLE_TOKEN = "test-console-token"
BEARER = {"Authorization": f"Bearer {CONSOLE_TOKEN}"}
EDIT_TAGS = "processed_by=console-test"
UNROUTED_TYPE = "profile.teleporting.success"
# In the sandbox's seed profiles: must never appear on a console page.
PERSONAL_DATA = ("Harry", "Potter", "John", "Doe", "Mathematic Departement")


class ConsoleServer(LoopbackServer):
    """The console app under a real uvicorn on 127.0.0.1, inside the test's loop."""

    def __init__(self, settings: Settings, token: str = CONSOLE_TOKEN) -> None:
        super().__init__(create_app(settings, token))


class ConsoleProcess:
    """``hrflow-webhooks console`` as a platform runs it: its own process, its own port."""

    def __init__(self, settings: Settings, token: str = CONSOLE_TOKEN) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "REDIS_URL": settings.redis_url,
            "HRFLOW_QUEUE_NAME": settings.queue_name,
            "HRFLOW_CONSOLE_TOKEN": token,
            "HRFLOW_CONSOLE_PORT": str(self.port),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "control.cli", "console"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        eventually_sync(self._answers, "the console process to answer", ignoring=(OSError,))

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            assert self.process.stderr is not None
            raise AssertionError(f"console exited: {self.process.stderr.read().decode()}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        if self.process.stderr is not None:
            self.process.stderr.close()


# --- sessions, as a browser holds them --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    cookie: str
    csrf: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Cookie": f"{COOKIE_NAME}={self.cookie}"}


async def log_in(http: aiohttp.ClientSession, url: str, token: str = CONSOLE_TOKEN) -> Session:
    """The login form, then the CSRF token as the overview's logout form carries it."""
    async with http.post(
        f"{url}/login", data={"token": token, "next": "/"}, allow_redirects=False
    ) as answer:
        assert answer.status == 303, await answer.text()
        cookie = answer.cookies[COOKIE_NAME].value
    async with http.get(f"{url}/", headers={"Cookie": f"{COOKIE_NAME}={cookie}"}) as page:
        html = await page.text()
    marker = f'name="{CSRF_FIELD}" value="'
    csrf = html.split(marker, 1)[1].split('"', 1)[0]
    return Session(cookie, csrf)


async def post(
    http: aiohttp.ClientSession,
    url: str,
    session: Session | None,
    form: Mapping[str, str],
    headers: Mapping[str, str] | None = None,
) -> tuple[int, str, str | None]:
    """(status, body, Location) of a form POST, not following the redirect."""
    sent = {**(session.headers if session else {}), **(headers or {})}
    async with http.post(url, data=dict(form), headers=sent, allow_redirects=False) as answer:
        return answer.status, await answer.text(), answer.headers.get("Location")


# --- a service state to look at ---------------------------------------------------------------


def edit_registry(settings: Settings) -> Registry:
    registry = Registry()
    edit.register(registry, settings)
    return registry


def console_settings(sandbox: SandboxServer, redis_url: str, **overrides: Any) -> Settings:
    return sandbox.settings(redis_url, edit_tags=EDIT_TAGS, max_tries=1, **overrides)


async def deliver(settings: Settings, http: aiohttp.ClientSession, *events: Any) -> None:
    async with receiver(settings) as server:
        for event in events:
            status, body = await server.post(http, event)
            assert status == 202, body


async def seed_service(
    settings: Settings, sandbox: SandboxServer, http: aiohttp.ClientSession
) -> None:
    """John Doe edited, Harry Potter's edit dead-lettered (HrFlow answers 400), an unrouted
    type, and a skip (the echo of our own edit of John Doe)."""
    sandbox.state.faults.add(Fault(endpoint="PUT /v1/profile/indexing", status=400, times=None))
    await deliver(settings, http, parsing_event(HARRY_POTTER_KEY, SAMPLE_SOURCE_KEY))
    await drain(settings, edit_registry(settings))
    sandbox.state.faults.clear()
    await deliver(
        settings,
        http,
        parsing_event(JOHN_DOE_KEY, SAMPLE_SOURCE_KEY),
        {"type": UNROUTED_TYPE, "origin": "api", "message": "?"},
    )
    await drain(settings, edit_registry(settings))
    # HrFlow announces our own edit: the handler recognises its echo and skips it.
    await deliver(settings, http, update_event(JOHN_DOE_KEY, SAMPLE_SOURCE_KEY, family="storing"))
    await drain(settings, edit_registry(settings))


# --- a real browser: Debian's chromium, driven by its chromium-driver ---------------------------

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # root in a container: chromium's sandbox needs user namespaces
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # no calls home: tests run behind firewalls too
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",  # a laptop screen
)


def chromium(user_data_dir: Path) -> WebDriver:
    """A fresh headless chromium; `make test` installs it (Makefile: chromium)."""
    if not CHROMEDRIVER.exists() or not CHROMIUM.exists():
        raise RuntimeError(
            f"{CHROMEDRIVER} or {CHROMIUM} is missing: `make test` installs Debian's "
            "chromium and chromium-driver packages (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    # The driver's path given: selenium never looks for (or downloads) one of its own.
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def browser_log_in(driver: WebDriver, url: str, token: str = CONSOLE_TOKEN) -> None:
    driver.get(f"{url}/login")
    driver.find_element(By.ID, "token").send_keys(token)
    click_through(driver, By.CSS_SELECTOR, "form[action='/login'] button")


def click_through(driver: WebDriver, by: str, value: str) -> None:
    """Click what leads to another page, and wait until that page has loaded.

    chromedriver's click returns once the click is dispatched: the form's POST or the
    link's GET may not have replaced the page yet, and a lookup right after it reads
    the old page (or finds its elements gone from under it). So wait for the old
    document to be gone, then for the new one to be complete.
    """
    wait = WebDriverWait(driver, TIMEOUT_S)
    # Found and clicked again if the page reloaded itself (the overview does every few
    # seconds) between finding the element and clicking it.
    page = wait.until(
        lambda d: _unless_replaced(lambda: _click(d, by, value)) or False,
        f"could not click {value}",
    )
    wait.until(
        lambda d: _unless_replaced(page.is_enabled) is None,
        f"no new page after clicking {value}",
    )
    wait.until(
        lambda d: d.execute_script("return document.readyState") == "complete",
        f"the page after clicking {value} never finished loading",
    )


def _click(driver: WebDriver, by: str, value: str) -> WebElement:
    """Click the element; its page (the document it was in)."""
    target = driver.find_element(by, value)
    page = target.find_element(By.XPATH, "ancestor::html")
    target.click()
    return page


def _unless_replaced(action: Callable[[], T]) -> T | None:
    """What ``action`` returns, or None when the document it touched was replaced."""
    try:
        return action()
    except WebDriverException as error:
        if _replaced_under_us(error):
            return None
        raise


def _replaced_under_us(error: WebDriverException) -> bool:
    """The element's document was replaced: gone (stale), or going while chromedriver
    looked at it, which it reports with this message instead."""
    going = "does not belong to the document" in (error.msg or "")
    return isinstance(error, StaleElementReferenceException) or going
