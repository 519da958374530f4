"""Browser tests of the console: one real cluster (Redis, a scheduler, cpu and io workers) and one
``nerv ui`` process for the module, driven with Playwright in Debian's chromium (no browser download).

The console runs behind basic auth, and its event streams end every ``STREAM_SECONDS`` so that every
live test also goes through the browser's reconnect with ``Last-Event-ID``.
"""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from nerv_cluster import constants
from tests.conftest import TEST_REDIS_URL
from tests.integration.cluster import HERE, Cluster

sys.path.insert(0, str(HERE))  # nerv_testtasks, for handles to the registered functions

#: The browser tests' database (the integration tests take 9-12, 14, 15; the benchmarks 13).
BROWSER_DB = 7
USER, PASSWORD = "admin", "browser-test-pw"
STREAM_SECONDS = "1.5"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Console:
    """The console under test: its URL, the cluster behind it, and the credentials."""

    def __init__(self, cluster: Cluster, url: str) -> None:
        self.cluster = cluster
        self.client = cluster.client
        self.url = url
        self.credentials = {"username": USER, "password": PASSWORD}


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """A cluster and a console on it, shared by the module's tests."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser tests need chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"browser tests need Redis at {TEST_REDIS_URL} (set NERV_TEST_REDIS_URL): {exc}")
    env = {
        constants.UI_USER_ENV: USER,
        constants.UI_PASSWORD_ENV: PASSWORD,
        constants.UI_STREAM_SECONDS_ENV: STREAM_SECONDS,
    }
    c = Cluster(f"{TEST_REDIS_URL}/{BROWSER_DB}", tmp_path_factory.mktemp("console"), **env)
    c.flush()
    try:
        c.scheduler()
        c.wait_leader()
        c.worker("cpu", 2)
        c.worker("io", 4)
        port = _free_port()
        ui = c.console(port=port)
        c.wait_log(ui, constants.UI_READY_LINE, timeout=30)
        yield Console(c, f"http://127.0.0.1:{port}")
    finally:
        c.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One headless chromium for the module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: object, console: Console) -> Iterator[object]:
    """A signed-in page (basic auth), closed after the test."""
    context = browser.new_context(  # type: ignore[attr-defined]
        http_credentials=console.credentials, base_url=console.url, viewport={"width": 1300, "height": 900}
    )
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    # And what the Content-Security-Policy refused (an inline script, a foreign asset): logged only.
    pg.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    try:
        yield pg
    finally:
        context.close()
    assert not errors, f"the page raised: {errors}"
