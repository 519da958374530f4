"""The console application's gatekeeping, through Starlette's test client and no Redis at all (the
client points at a closed port: every request here must be answered before Redis is needed)."""

from __future__ import annotations

import warnings

import pytest

with warnings.catch_warnings():
    # Starlette 1.x warns that its test client moves from httpx to httpx2: not ours to fix here.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from nerv_cluster import constants
from nerv_cluster.client import Client
from nerv_cluster.console import create_app, serve
from nerv_cluster.console.auth import AuthConfig
from nerv_cluster.errors import ConfigurationError
from nerv_cluster.settings import Settings

NO_REDIS = "redis://127.0.0.1:1/0"
TOKEN = "t0ken-for-tests"


def _client(auth: AuthConfig) -> TestClient:
    client = Client(settings=Settings(redis_url=NO_REDIS, redis_retries=0))
    return TestClient(create_app(client, auth=auth), base_url="http://console.test")


def test_a_token_guards_every_page_and_a_browser_signs_in_once() -> None:
    with _client(AuthConfig(token=TOKEN)) as http:
        assert http.get("/api/openapi.json").status_code == 401
        assert http.get("/api/openapi.json", headers={"authorization": "Bearer nope"}).status_code == 401
        ok = http.get("/api/openapi.json", headers={"authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and "/api/runs/{run_id}/events" in ok.json()["paths"]
        # A browser is sent to the sign-in page, which needs no credentials (nor do its assets).
        page = http.get("/", headers={"accept": "text/html"}, follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login"
        login = http.get("/login")
        assert login.status_code == 200 and http.get("/static/console.js").status_code == 200
        csp = login.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "<script>" not in login.text
        csrf = http.cookies[constants.UI_CSRF_COOKIE]
        assert csrf in login.text
        # Signing in without the form's CSRF token is refused; with a wrong token it fails.
        assert http.post("/login", data={"token": TOKEN}, follow_redirects=False).status_code == 403
        wrong = http.post("/login", data={"token": "nope", "csrf": csrf}, follow_redirects=False)
        assert wrong.status_code == 200 and "not the console" in wrong.text
        assert constants.UI_TOKEN_COOKIE not in http.cookies
        signed = http.post("/login", data={"token": TOKEN, "csrf": csrf}, follow_redirects=False)
        assert signed.status_code == 303
        assert "httponly" in signed.headers["set-cookie"].lower()
        assert "samesite=strict" in signed.headers["set-cookie"].lower()
        assert http.get("/api/openapi.json").status_code == 200  # the cookie now


def test_actions_need_the_csrf_token_unless_a_bearer_header_sent_them() -> None:
    with _client(AuthConfig(user="admin", password="pw")) as http:
        auth = ("admin", "pw")
        assert http.get("/api/openapi.json").headers["www-authenticate"].startswith("Basic")
        http.get("/login")  # sets the CSRF cookie
        # Basic auth is sent by browsers on their own: a forged cross-site POST has it, not the token.
        forged = http.post("/api/runs/r1/cancel", json={}, auth=auth)
        assert forged.status_code == 403 and "CSRF" in forged.json()["error"]
        other_site = http.post(
            "/api/runs/r1/cancel",
            json={},
            auth=auth,
            headers={
                constants.UI_CSRF_HEADER: http.cookies[constants.UI_CSRF_COOKIE],
                "origin": "http://evil.example",
            },
        )
        assert other_site.status_code == 403
        assert http.post("/api/runs/r1/cancel", content=b"[1, 2]", auth=auth).status_code == 400


def test_the_console_refuses_a_public_address_without_credentials() -> None:
    settings = Settings(redis_url=NO_REDIS)
    with pytest.raises(ConfigurationError, match="without authentication"):
        serve("0.0.0.0", 0, settings=settings, auth=AuthConfig())
    with pytest.raises(ConfigurationError, match="without authentication"):
        serve("192.168.1.10", 0, settings=settings, auth=AuthConfig())
