"""Who may use the console, and whether a POST really comes from one of its own pages.

Pure functions of the request's headers and the token: no I/O, no globals.

- **Bearer**: ``Authorization: Bearer <HRFLOW_CONSOLE_TOKEN>``, for scripts. A browser never
  sends this header on its own, so a cross-site page cannot ride on it: such requests need
  no CSRF token.
- **Session cookie**, for people: the login form checks the token once and sets
  ``<issued>.<nonce>.<mac>``, where the MAC is an HMAC-SHA256 keyed with the token. The
  cookie never holds the token, expires after :data:`SESSION_LIFETIME_S`, and every
  session dies when the token is rotated; logging out revokes the session in Redis
  (``QueueKeys.console_revoked``, checked by ``guard``), so a copy of the cookie dies
  with it. The cookie is HttpOnly, SameSite=Strict, and Secure whenever the console is
  reached over https (its configured origin, or a trusted proxy's X-Forwarded-Proto).
- **CSRF**: each session's token is the HMAC of its nonce (so it is per session and needs
  no server-side storage); every form carries it in a hidden field, checked with
  ``compare_digest``. Independently, a POST from another site's page (by its ``Origin``
  and ``Sec-Fetch-Site`` headers, :func:`origin_is_foreign`) is refused, whatever it
  carries. The console's own origins are configured (``HRFLOW_CONSOLE_ORIGIN``) or its
  loopback addresses, never read from the request's ``Host``: a page at a name rebound
  to the console's address sends that name as both.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass

COOKIE_NAME = "hrflow_console"
CSRF_FIELD = "csrf"
SESSION_LIFETIME_S = 12 * 3600  # a working day: long enough not to nag, short if leaked


@dataclass(frozen=True, slots=True)
class Access:
    """A request let in: its CSRF token, or None for a Bearer request (exempt, see above),
    and its session's nonce (what logging out revokes)."""

    csrf: str | None
    session: str | None = None

    @property
    def via_session(self) -> bool:
        return self.csrf is not None


def _mac(token: str, purpose: str, *parts: str) -> str:
    message = "|".join((purpose, *parts)).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def new_session_cookie(token: str, now_s: float) -> str:
    issued, nonce = str(int(now_s)), secrets.token_urlsafe(16)
    return f"{issued}.{nonce}.{_mac(token, 'session', issued, nonce)}"


def session_nonce(cookie: str) -> str:
    return cookie.split(".")[1]


def session_ends_at(cookie: str) -> float:
    return int(cookie.split(".")[0]) + SESSION_LIFETIME_S


def csrf_token(token: str, cookie: str) -> str:
    return _mac(token, "csrf", session_nonce(cookie))


def session_is_valid(token: str, cookie: str, now_s: float) -> bool:
    parts = cookie.split(".")
    if len(parts) != 3 or not (parts[0].isascii() and parts[0].isdigit()):
        return False
    issued, nonce, mac = parts
    if not hmac.compare_digest(mac.encode(), _mac(token, "session", issued, nonce).encode()):
        return False
    return 0 <= now_s - int(issued) < SESSION_LIFETIME_S


def bearer_is_valid(token: str, authorization: str | None) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def token_is_valid(token: str, given: str) -> bool:
    """The login form's check: constant time, whatever the length of ``given``."""
    return hmac.compare_digest(given.encode(), token.encode())


def access_of(
    token: str, headers: Mapping[str, str], cookies: Mapping[str, str], now_s: float
) -> Access | None:
    """The request's access, or None: it must log in (401)."""
    if bearer_is_valid(token, headers.get("authorization")):
        return Access(csrf=None)
    cookie = cookies.get(COOKIE_NAME, "")
    if cookie and session_is_valid(token, cookie, now_s):
        return Access(csrf=csrf_token(token, cookie), session=session_nonce(cookie))
    return None


def origin_is_foreign(
    origin: str | None, fetch_site: str | None, own_origins: Collection[str]
) -> bool:
    """A POST from another site's page: refused, whatever it carries.

    ``Origin`` must be the console's own when present. One exception: with
    ``Referrer-Policy: no-referrer`` (ours) Chromium sends ``Origin: null`` even on the
    console's own forms, so "null" passes only when the browser's Fetch Metadata
    (``Sec-Fetch-Site: same-origin``) vouches for it. Fetch Metadata naming another site
    is refused even without an Origin. Tools usually send neither: the token decides."""
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return True
    if origin is None or origin in own_origins:
        return False
    return not (origin == "null" and fetch_site == "same-origin")


def csrf_is_valid(access: Access, given: str | None) -> bool:
    if access.csrf is None:
        return True  # Bearer: no ambient credential to forge a request with
    return given is not None and hmac.compare_digest(given.encode(), access.csrf.encode())


def safe_next(path: str | None) -> str:
    """Where to go after logging in: a path on this console only, never another site."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path
