"""The launcher's promises, through real processes: its own group per service, a log per service, a
warm stop that reaches the service's own process (also under a forking wrapper), nothing left behind
(also a SIGKILLed Celery main process's pool children), and an interrupted stop that still kills all.

The first tests run small Python scripts as services (no Redis needed); the last ones real workers.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

import nerv_launchertasks as lt
import pytest

from nerv_cluster import RunStatus, Workflow
from nerv_cluster.errors import ServiceFailed
from nerv_cluster.launcher import LocalCluster, Service, group_members
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.timeout(120)

#: A stand-in service. ``fork``: it forks a child first (like a Celery pool) that ignores SIGTERM;
#: ``stubborn``: it ignores SIGTERM itself. Otherwise SIGTERM makes it log ``warm exit`` and exit 0.
_SCRIPT = """
import os, signal, sys, time
def term(*_):
    print("warm exit", os.environ.get("MARK", ""), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if "stubborn" in sys.argv else term)
if "fork" in sys.argv and os.fork() == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1)
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(1)
"""
_COMMAND = (sys.executable, "-c", _SCRIPT)
#: A wrapper that forks its command instead of exec-ing it (as ``faketime`` does): the ``; :`` keeps the
#: shell from exec-ing its last command.
_FORKING_WRAPPER = ("sh", "-c", '"$@"; :', "sh")


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[LocalCluster]:
    lc = LocalCluster("redis://127.0.0.1:1/0", tmp_path / "logs", command=_COMMAND)
    try:
        yield lc
    finally:
        lc.stop(timeout=1)


def _wait_members(service: Service, n: int, timeout: float = 20) -> set[int]:
    deadline = time.monotonic() + timeout
    while len(members := service.members()) < n:
        assert time.monotonic() < deadline, f"{service.name}: {members}; log:\n{service.log_tail()}"
        time.sleep(0.05)
    return members


def test_each_service_leads_its_own_group_and_writes_its_own_log(launcher: LocalCluster) -> None:
    a = launcher.spawn("svc")
    b = launcher.spawn("svc", "fork")
    assert (a.name, b.name) == ("svc", "svc-2") and a.log_path != b.log_path
    for s in (a, b):
        s.wait_log("ready", timeout=20)
        assert os.getpgid(s.pid) == s.pid and os.getsid(s.pid) == s.pid
    assert f"ready {a.pid}" in a.log_text() and f"ready {b.pid}" in b.log_text()
    assert len(_wait_members(b, 2)) == 2  # the forked child stays in the service's group


@pytest.mark.parametrize(
    "wrapper",
    [(), ("env", "MARK=wrapped"), _FORKING_WRAPPER],
    ids=["plain", "exec-wrapper", "forking-wrapper"],
)
def test_warm_stop_reaches_the_service_process(launcher: LocalCluster, wrapper: Sequence[str]) -> None:
    svc = launcher.spawn("svc", wrapper=wrapper)
    svc.wait_log("ready", timeout=20)
    if wrapper == _FORKING_WRAPPER:
        assert len(_wait_members(svc, 2)) == 2  # the shell and, under it, the service
    launcher.stop(timeout=20)
    assert "warm exit" in svc.log_text(), svc.log_tail()
    if wrapper[:1] == ("env",):
        assert "warm exit wrapped" in svc.log_text()
    assert svc.returncode == 0 and group_members(svc.pid) == set()


def test_stop_leaves_nothing_of_a_group_whose_main_process_was_sigkilled(launcher: LocalCluster) -> None:
    svc = launcher.spawn("svc", "fork")
    svc.wait_log("ready", timeout=20)
    child = (_wait_members(svc, 2) - {svc.pid}).pop()
    os.kill(svc.pid, signal.SIGKILL)
    svc.wait(timeout=10)
    assert child in svc.members(), "the orphan lives on in the group until stop()"
    launcher.stop(timeout=1)
    assert group_members(svc.pid) == set()


def test_an_interrupt_during_the_grace_period_still_kills_everything(launcher: LocalCluster) -> None:
    svc = launcher.spawn("svc", "stubborn", "fork")
    svc.wait_log("ready", timeout=20)
    _wait_members(svc, 2)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            launcher.stop(timeout=60)  # it ignores SIGTERM: only the interrupt ends the grace period
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 15
    assert svc.returncode == -signal.SIGKILL and group_members(svc.pid) == set()


def test_wait_log_fails_with_the_service_when_it_exits_first(tmp_path: Path) -> None:
    with LocalCluster("redis://127.0.0.1:1/0", tmp_path, command=(sys.executable, "-c")) as lc:
        svc = lc.spawn("quitter", "print('bye'); raise SystemExit(3)")
        with pytest.raises(ServiceFailed) as info:
            svc.wait_log("ready", timeout=20)
    assert info.value.service is svc and "exited with code 3" in str(info.value)
    assert svc.log_tail() == "bye"


# -- real workers -------------------------------------------------------------------------------------


def test_stop_leaves_nothing_of_a_sigkilled_worker_whose_task_started_a_helper(own_cluster: Cluster) -> None:
    c = own_cluster
    c.env["NERV_WORKER_MODULES"] = "nerv_testtasks,nerv_launchertasks"
    c.scheduler()
    c.wait_leader()
    worker = c.worker("cpu", 2)
    wf = Workflow("helper")
    wf.add(lt.leave_a_helper, 300.0, id="helper")
    res = c.client.wait(c.client.submit(wf), timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    helper = res.results["helper"]
    assert os.getpgid(helper) == worker.pid, "the helper runs in the worker's group"
    os.kill(worker.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
    worker.wait(timeout=10)
    assert helper in worker.members(), "the helper outlives the worker's main process and its pool"
    c.stop()
    assert {s.name: s.members() for s in c.procs} == {"scheduler": set(), "worker-cpu": set()}


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime (Debian package faketime)")
def test_a_worker_under_faketime_shuts_down_warm(own_cluster: Cluster) -> None:
    c = own_cluster
    worker = c.worker("io", 2, wrapper=("faketime", "-f", "-45s"))
    main_exe = os.path.realpath(f"/proc/{worker.pid}/exe")
    assert os.path.basename(main_exe) == "faketime", main_exe  # faketime forks the worker under it
    c.stop(timeout=30, warm=True)
    assert "Warm shutdown" in worker.log_text(), worker.log_tail()
    assert group_members(worker.pid) == set()


def test_a_second_stop_never_signals_a_group_again(
    launcher: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = launcher.spawn("svc")
    svc.wait_log("ready", timeout=20)
    launcher.stop(timeout=20)
    assert svc.gone, "stopped, reaped and its group empty"
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "killpg", lambda pgid, sig: sent.append((pgid, sig)))
    launcher.stop(timeout=1)  # its pid may belong to somebody else by now
    assert sent == []
