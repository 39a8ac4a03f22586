"""``hrflow-webhooks console``: decide the token, refuse unsafe set-ups, serve with uvicorn.

The rules, checked before anything listens:

- on an interface other than loopback, ``HRFLOW_CONSOLE_TOKEN`` is required: the console
  replays and purges, and must not be one guess away from the network;
- on loopback without a token, a random one is generated for this start and printed with
  the login URL (only this machine's users can reach the port);
- never on the public webhook port (``PORT``, the platform's): the receiver's port is the
  one exposed to the internet.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from hrflow_webhooks.settings import Settings


class ConsoleSetupError(RuntimeError):
    """The console refuses to start as configured; the message says what to change."""


@dataclass(frozen=True, slots=True)
class ConsoleToken:
    value: str
    generated: bool  # made up for this start: print it, nobody else knows it


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


# A token anyone can guess is no lock: the console's login has no attempt limit.
MIN_TOKEN_LENGTH = 16


def decide_token(settings: Settings) -> ConsoleToken:
    if settings.console_token is not None and settings.console_token.get_secret_value():
        given = settings.console_token.get_secret_value()
        if len(given) < MIN_TOKEN_LENGTH:
            raise ConsoleSetupError(
                f"HRFLOW_CONSOLE_TOKEN is {len(given)} characters: use at least "
                f"{MIN_TOKEN_LENGTH} (python -c 'import secrets; print(secrets.token_urlsafe(24))')"
            )
        return ConsoleToken(given, generated=False)
    if not is_loopback(settings.console_host):
        raise ConsoleSetupError(
            f"HRFLOW_CONSOLE_TOKEN is not set: the console refuses to listen on "
            f"{settings.console_host} without one (set it, or HRFLOW_CONSOLE_HOST=127.0.0.1)"
        )
    return ConsoleToken(secrets.token_urlsafe(24), generated=True)


def check_port(settings: Settings, public_port: str | None) -> None:
    if public_port is not None and public_port.strip() == str(settings.console_port):
        raise ConsoleSetupError(
            f"HRFLOW_CONSOLE_PORT is {settings.console_port}, the public webhook port (PORT): "
            "the console must listen on a port of its own"
        )


def console_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/"


def announce(settings: Settings, token: ConsoleToken, say: Callable[[str], None]) -> None:
    url = console_url(settings.console_host, settings.console_port)
    if token.generated:
        say(
            "warning: HRFLOW_CONSOLE_TOKEN is not set; a token was generated for this start "
            "(loopback only)"
        )
        say(f"console {url}login  token: {token.value}")
    else:
        say(f"console {url}  (log in with HRFLOW_CONSOLE_TOKEN)")


def serve(settings: Settings, public_port: str | None, say: Callable[[str], None]) -> None:
    """Check, announce, then serve until SIGINT/SIGTERM (uvicorn's own handling)."""
    from control.console.app import create_app

    check_port(settings, public_port)
    token = decide_token(settings)
    announce(settings, token, say)
    uvicorn.run(
        create_app(settings, token.value),
        host=settings.console_host,
        port=settings.console_port,
        log_level="warning",
        access_log=False,  # the overview refreshes itself: its log lines would be noise
        server_header=False,
        lifespan="on",
        # X-Forwarded-For/-Proto only from the proxies an operator named: uvicorn's default
        # trusts loopback, where a port-forward or tunnel would let any client pick a new
        # address per guess (control.console.throttle).
        proxy_headers="FORWARDED_ALLOW_IPS" in os.environ,
    )
