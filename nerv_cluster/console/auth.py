"""Who may use the console, and which requests may change something.

Authentication: a bearer token (``NERV_UI_TOKEN``) or a user and password for basic auth
(``NERV_UI_USER`` / ``NERV_UI_PASSWORD``), from the environment. A browser sends basic auth by itself;
with a token it signs in once on ``/login``, which keeps the token in an HttpOnly, SameSite=Strict
cookie. Without credentials configured the console serves only a loopback address (:func:`check_bind`),
where only this machine's users reach it.

CSRF: every request that changes something is a POST, and a POST that the browser could have been
tricked into sending (any not authenticated by an ``Authorization: Bearer`` header, which no browser
adds by itself) must carry the double-submit token: the ``X-CSRF-Token`` header (or a ``csrf`` form
field) equal to the ``nerv_ui_csrf`` cookie, which another site can neither read nor set. A request
whose ``Origin`` names another host is refused too.

Invariant: no route but ``/healthz`` and ``/login`` answers without the credentials when they are set.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlsplit

from nerv_cluster import constants
from nerv_cluster.errors import ConfigurationError
from nerv_cluster.settings import Settings

#: Paths served to anyone: the probe and the sign-in page (and what that page needs).
OPEN_PATHS = ("/healthz", "/login", "/static/")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """The console's credentials: a bearer token, or a basic-auth user and password, or none."""

    token: str | None = None
    user: str | None = None
    password: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AuthConfig:
        """Read ``NERV_UI_TOKEN``, ``NERV_UI_USER`` and ``NERV_UI_PASSWORD`` (empty means unset);
        :class:`ConfigurationError` for a user without a password or the other way round."""
        return cls.from_settings(Settings.from_env(os.environ if environ is None else environ))

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthConfig:
        """The credentials of ``settings`` (``ui_token``, ``ui_user``, ``ui_password``)."""
        token = settings.ui_token or None
        user = settings.ui_user or None
        password = settings.ui_password or None
        if (user is None) != (password is None):
            raise ConfigurationError(
                f"set both {constants.UI_USER_ENV} and {constants.UI_PASSWORD_ENV} for basic auth, or neither"
            )
        return cls(token=token, user=user, password=password)

    @property
    def enabled(self) -> bool:
        """True when some credential is configured (every page then asks for it)."""
        return self.token is not None or self.user is not None

    def bearer_ok(self, presented: str) -> bool:
        """True when ``presented`` is the configured token (compared in constant time)."""
        return self.token is not None and hmac.compare_digest(presented.encode(), self.token.encode())

    def basic_ok(self, user: str, password: str) -> bool:
        """True when the user and password are the configured ones (compared in constant time)."""
        if self.user is None or self.password is None:
            return False
        same_user = hmac.compare_digest(user.encode(), self.user.encode())
        same_password = hmac.compare_digest(password.encode(), self.password.encode())
        return same_user and same_password


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


def check_bind(host: str, auth: AuthConfig) -> None:
    """Refuse (:class:`ConfigurationError`) to serve a non-loopback address without credentials."""
    if not auth.enabled and not is_loopback(host):
        raise ConfigurationError(
            f"the console will not listen on {host} without authentication: set {constants.UI_TOKEN_ENV} "
            f"(a bearer token) or {constants.UI_USER_ENV} and {constants.UI_PASSWORD_ENV} (basic auth), "
            "or listen on 127.0.0.1"
        )


def _header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def cookies(scope: Mapping[str, Any]) -> dict[str, str]:
    """The request's cookies."""
    raw = _header(scope, b"cookie")
    if not raw:
        return {}
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:  # a malformed Cookie header is no cookie, never an error page
        return {}
    return {k: m.value for k, m in jar.items()}


def authenticated(scope: Mapping[str, Any], auth: AuthConfig) -> str | None:
    """How the request proved who it is (``"bearer"``, ``"basic"``, ``"cookie"``, or ``"open"`` when no
    credentials are configured), or None when it did not."""
    if not auth.enabled:
        return "open"
    header = _header(scope, b"authorization") or ""
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and auth.bearer_ok(value.strip()):
        return "bearer"
    if scheme == "basic":
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        if auth.basic_ok(user, password):
            return "basic"
    token = cookies(scope).get(constants.UI_TOKEN_COOKIE)
    if token and auth.bearer_ok(token):
        return "cookie"
    return None


def same_origin(scope: Mapping[str, Any]) -> bool:
    """False when the request's ``Origin`` (or, without one, its ``Referer``) names another host than
    the one it was sent to; True when it names this host or neither header is there."""
    origin = _header(scope, b"origin") or _header(scope, b"referer")
    if not origin or origin == "null":
        return origin != "null"
    host = _header(scope, b"host") or ""
    return urlsplit(origin).netloc.lower() == host.lower()


def csrf_ok(scope: Mapping[str, Any], form_token: str | None = None) -> bool:
    """The double-submit check: the ``X-CSRF-Token`` header (or ``form_token``) equals the CSRF cookie,
    and the request comes from this origin."""
    expected = cookies(scope).get(constants.UI_CSRF_COOKIE)
    presented = _header(scope, constants.UI_CSRF_HEADER.encode()) or form_token
    if not expected or not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode()) and same_origin(scope)


def new_csrf_token() -> str:
    """A fresh random CSRF token."""
    return secrets.token_urlsafe(24)


class AuthMiddleware:
    """ASGI middleware: 401 (with a basic-auth challenge when basic auth is configured) for a request
    without the credentials, except on :data:`OPEN_PATHS`. Pure ASGI, so streamed responses (Server-
    Sent Events) pass through untouched."""

    def __init__(self, app: Any, auth: AuthConfig) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.auth.enabled:
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        how = authenticated(scope, self.auth)
        if how is None and not any(path == p or (p.endswith("/") and path.startswith(p)) for p in OPEN_PATHS):
            await self._refuse(scope, send)
            return
        scope.setdefault("state", {})["auth"] = how
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Any, send: Any) -> None:
        wants_html = "text/html" in (_header(scope, b"accept") or "")
        headers = [(b"cache-control", b"no-store")]
        if self.auth.user is not None:
            headers.append((b"www-authenticate", b'Basic realm="nerv console", charset="UTF-8"'))
        if wants_html and self.auth.token is not None and self.auth.user is None:
            # A browser with a token to type: send it to the sign-in page.
            headers.append((b"location", b"/login"))
            await send({"type": "http.response.start", "status": 303, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b'{"error":"authentication required"}'
        headers.append((b"content-type", b"application/json"))
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


__all__ = [
    "AuthConfig",
    "AuthMiddleware",
    "authenticated",
    "check_bind",
    "cookies",
    "csrf_ok",
    "is_loopback",
    "new_csrf_token",
    "same_origin",
]
