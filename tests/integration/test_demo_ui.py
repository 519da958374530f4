"""``nerv demo --ui``: the demo's cluster stays up with the console after the run, until stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.cluster import ROOT

pytestmark = pytest.mark.timeout(90)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_ui_serves_the_run_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NERV_")}  # the embedded Redis
    env["PYTHONPATH"] = str(ROOT)
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nerv_cluster", "demo", "--ui", "--ui-port", str(port), "--pages", "5"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C to stop" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"the demo exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the demo never stayed up:\n{log.read_text()}"
            time.sleep(0.2)
        text = log.read_text()
        assert "correct" in text and f"http://127.0.0.1:{port}/runs/" in text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=10) as resp:
            (run,) = json.loads(resp.read())["runs"]
        assert run["status"] == "COMPLETED" and run["total"] == 11
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/runs/{run['run_id']}", timeout=10) as resp:
            assert resp.status == 200
        time.sleep(1.0)
        assert proc.poll() is None, "the demo did not stay up"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130, log.read_text()
        assert "stopped 4 services and Redis" in log.read_text()  # scheduler, 2 workers, console
        with socket.socket() as s:  # nothing listens on the console's port any more
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
