"""``nerv dev --app MODULE`` as a user runs it (issue 12, part 8): a subprocess that brings up Redis, a
scheduler and workers for a module in a directory of its own, reloads them when the module's file
changes (also past a version that does not import), and leaves nothing running after Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from nerv_cluster import Client, RunStatus, Workflow
from nerv_cluster.constants import DEV_RELOADED_LINE
from nerv_cluster.launcher import group_members
from tests.integration.cluster import ROOT

pytestmark = pytest.mark.timeout(120)

APP = """\
from nerv_cluster import task


@task(queue="cpu")
def answer() -> int:
    return {value}


@task(queue="io")
def tenfold(x: int) -> int:
    return x * 10
"""


class Output:
    """The lines a subprocess prints, read as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        assert proc.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` in a line from line ``after`` on."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[after:]:
                m = re.search(pattern, line)
                if m:
                    return m
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r}; output:\n{self.text}")
            time.sleep(0.05)


def _pids(ready: str) -> dict[str, int]:
    """Service name -> pid, from a ``ready after ...`` line."""
    return {name: int(pid) for name, pid in re.findall(r"([\w-]+) pid (\d+)", ready)}


def _answer_run(client: Client) -> dict:
    wf = Workflow("dev-app")
    a = wf.add("devapp.answer", id="a")
    wf.add("devapp.tenfold", a, id="b", queue="io")
    res = client.wait(client.submit(wf), timeout=30)
    assert res.status is RunStatus.COMPLETED, res.reason
    return res.results


def test_nerv_dev_serves_a_module_reloads_it_on_change_and_leaves_nothing_after_ctrl_c(tmp_path: Path):
    module = tmp_path / "devapp.py"
    module.write_text(APP.format(value=1))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "NERV_METRICS_PORT": "0",
        "NERV_LEASE_TTL_MS": "2000",
        "COLUMNS": "200",
    }
    with socket.socket() as sock:  # a free port for the console
        sock.bind(("127.0.0.1", 0))
        ui_port = sock.getsockname()[1]
    command = [sys.executable, "-m", "nerv_cluster", "dev", "--app", "devapp", "--cpu", "1", "--io", "2"]
    proc = subprocess.Popen(
        [*command, "--ui", "--ui-port", str(ui_port)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = Output(proc)
    pids: set[int] = set()
    client: Client | None = None
    try:
        url = out.wait_for(r"^NERV_REDIS_URL=(redis://\S+)$", 30).group(1)
        redis_pid = int(out.wait_for(r"redis\s+redis://\S+ \(embedded, pid (\d+)\)", 5).group(1))
        ready = _pids(out.wait_for(r"^ready after .*: (.*)$", 60).group(1))
        assert sorted(ready) == ["console", "scheduler", "worker-cpu", "worker-io"], ready
        pids |= set(ready.values())
        client = Client(url)
        assert _answer_run(client) == {"a": 1, "b": 10}
        console = out.wait_for(r"^console: (http://\S+)$", 5).group(1)
        with urllib.request.urlopen(f"{console}api/runs", timeout=10) as answer:  # loopback: no login
            runs = json.load(answer)
        assert any(r["name"] == "dev-app" for r in runs["runs"]), runs

        mark = len(out.lines)
        module.write_text(APP.format(value=2))  # the user edits a task's return value
        out.wait_for(r"devapp\.py changed: reloading", 10, after=mark)
        again = _pids(out.wait_for(r"^ready after .*: (.*)$", 60, after=mark).group(1))
        out.wait_for(f"^{DEV_RELOADED_LINE}$", 5, after=mark)
        assert again.pop("console") == ready["console"], "the console is not restarted"
        new = set(again.values())
        assert len(new) == 3 and not new & pids, "new processes for the scheduler and the workers"
        pids |= new
        assert _answer_run(client) == {"a": 2, "b": 20}, "the reloaded workers run the new code"

        mark = len(out.lines)
        module.write_text("def broken(:\n")  # a syntax error: the services cannot start
        out.wait_for(r"waiting for a change to the app's files", 60, after=mark)
        mark = len(out.lines)
        module.write_text(APP.format(value=3))  # fixed: up again
        pids |= set(_pids(out.wait_for(r"^ready after .*: (.*)$", 60, after=mark).group(1)).values())
        assert _answer_run(client) == {"a": 3, "b": 30}
    finally:
        if client is not None:
            client.close()
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, out.text
    assert re.search(r"stopped \d+ services and Redis", out.text), out.text
    for pid in (*pids, redis_pid):
        assert not group_members(pid), f"process group {pid} still has processes: {group_members(pid)}"
    probe = redis.Redis.from_url(url, socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        probe.ping()
    probe.close()
