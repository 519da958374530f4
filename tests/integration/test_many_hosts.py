"""Workers on many hosts: three network namespaces reach Redis over their own veth links, not loopback.

A run spreads over the three hosts; then one host's link is cut mid-run while it runs tasks. Its worker
is not killed, it is unreachable (like a host whose network died): its heartbeat lapses, the scheduler's
watchdog re-dispatches its running tasks (and re-sends the jobs it had prefetched) within seconds, and
the run completes with every task recorded COMPLETED exactly once.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and ``ip`` (iproute2); skipped, with the reason, where
creating a namespace is refused.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, RunStatus, Workflow
from nerv_cluster.embedded import EmbeddedRedis
from nerv_cluster.launcher import Service
from nerv_cluster.model import Event
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of
from tests.integration.netns import Host, Hosts, why_hosts_unavailable

_REFUSED = why_hosts_unavailable()
if _REFUSED:
    print(f"many-hosts test skipped: cannot create network namespaces and veth links here: {_REFUSED}")

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        _REFUSED is not None, reason=f"cannot create network namespaces and veth links here: {_REFUSED}"
    ),
]

TASKS = 300


@dataclass
class ManyHosts:
    c: Cluster
    hosts: Hosts
    server: EmbeddedRedis
    workers: dict[str, Service]  # hostname -> worker service
    by_pid: dict[int, Host]

    def host_of(self, worker_id: str) -> Host:
        """The host a worker id (``hostname:pid:rand``) belongs to, by the namespace its pid runs in."""
        name, pid, _ = worker_id.split(":")
        host = self.by_pid[int(pid)]
        assert host.hostname == name, (worker_id, host)
        return host


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    h = Hosts(3).create()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def many_hosts(hosts: Hosts, tmp_path: Path) -> Iterator[ManyHosts]:
    """Redis bound to loopback (the scheduler's side) and each link's root-side address; a cpu worker
    (2 processes) on each host."""
    server = EmbeddedRedis(extra_args=["--bind", "127.0.0.1", *(h.root_addr for h in hosts.hosts)])
    server.start()
    c = Cluster(server.url, tmp_path)
    try:
        c.scheduler()
        workers = {
            h.hostname: hosts.worker(c, h, f"redis://{h.root_addr}:{server.port}/0") for h in hosts.hosts
        }
        c.wait_leader()
        for proc in workers.values():
            c.wait_log(proc, "ready with", timeout=40)
        by_pid = {pid: h for h in hosts.hosts for pid in hosts.pids(h)}
        yield ManyHosts(c, hosts, server, workers, by_pid)
    finally:
        c.stop()
        server.close()


def _completed(events: list[Event]) -> list[Event]:
    return [ev for ev in events if ev.type is EventType.TASK_COMPLETED]


def _running(events: list[Event]) -> dict[str, Event]:
    """Task id -> the TASK_STARTED of attempts that have no outcome recorded (yet)."""
    started: dict[tuple[str, int], Event] = {}
    for ev in events:
        key = (ev.task_id or "", ev.attempt or 0)
        if ev.type is EventType.TASK_STARTED:
            started[key] = ev
        elif ev.type in (EventType.TASK_COMPLETED, EventType.TASK_FAILED, EventType.TASK_PENDING):
            started.pop(key, None)
    return {tid: ev for (tid, _), ev in started.items()}


def _fan(name: str, seconds: float) -> Workflow:
    """TASKS sleeping tasks, then a join over all of them."""
    wf = Workflow(name)
    legs = [wf.add(tt.slow, seconds, id=f"t{i:03d}") for i in range(TASKS)]
    wf.add(tt.total, *legs, id="join")
    return wf


def test_workers_on_three_hosts_share_a_run_and_a_cut_host_loses_nothing(many_hosts: ManyHosts) -> None:
    m, c = many_hosts, many_hosts.c
    ids = {f"t{i:03d}" for i in range(TASKS)} | {"join"}

    # Every worker process reaches Redis from its host's own address, over the veth link.
    clients = c.redis.client_list()
    peers = {cl["addr"].rsplit(":", 1)[0] for cl in clients}
    assert {h.host_addr for h in m.hosts.hosts} <= peers, peers
    assert {m.host_of(w).hostname for w in _worker_ids(c)} == {h.hostname for h in m.hosts.hosts}

    # 1. A run of 300 short tasks spreads over the three hosts.
    res = c.client.wait(c.client.submit(_fan("many-hosts-spread", 0.02)), timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results["join"] == pytest.approx(TASKS * 0.02)
    events = log_of(c.client, res.run_id)
    done = _completed(events)
    assert Counter(ev.task_id for ev in done) == Counter(dict.fromkeys(ids, 1))
    spread = Counter(m.host_of(ev.data["worker"]).hostname for ev in done)
    print(f"spread of {len(done)} tasks over hosts: {dict(sorted(spread.items()))}")
    assert set(spread) == {h.hostname for h in m.hosts.hosts}, spread
    assert min(spread.values()) >= TASKS // 20, f"a host barely ran anything: {spread}"

    # 2. Cut one host's link while it runs tasks.
    run_id = c.client.submit(_fan("many-hosts-cut", 0.1))
    deadline = time.monotonic() + 30
    victim: Host | None = None
    while time.monotonic() < deadline and victim is None:
        events = log_of(c.client, run_id)
        if len(_completed(events)) >= TASKS // 5:
            busy = Counter(m.host_of(ev.data["worker"]).hostname for ev in _running(events).values())
            if busy:
                name = busy.most_common(1)[0][0]
                victim = next(h for h in m.hosts.hosts if h.hostname == name)
        time.sleep(0.02)
    assert victim is not None, "no host was running tasks a fifth into the run"
    m.hosts.cut(victim)
    t_cut = time.monotonic()
    time.sleep(0.5)  # what the victim wrote before the cut has landed; it can write nothing after
    before = log_of(c.client, run_id)
    stranded = {tid: ev for tid, ev in _running(before).items() if m.host_of(ev.data["worker"]) is victim}
    assert stranded, "the cut host was running nothing"
    victim_done_before = {ev.id for ev in _completed(before) if m.host_of(ev.data["worker"]) is victim}

    res = c.client.wait(run_id, timeout=60)
    took = time.monotonic() - t_cut
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results["join"] == pytest.approx(TASKS * 0.1)
    assert took < 30, f"re-dispatch must take seconds, not the visibility timeout ({took:.1f}s)"
    events = log_of(c.client, run_id)
    done = _completed(events)
    assert Counter(ev.task_id for ev in done) == Counter(dict.fromkeys(ids, 1)), "each task completes once"
    by_task = {ev.task_id: ev for ev in done}
    lost = {
        (ev.task_id, ev.attempt): ev.data["reason"]
        for ev in events
        if ev.type is EventType.TASK_PENDING and "lost" in ev.data.get("reason", "")
    }
    for tid, started in stranded.items():
        assert (tid, started.attempt) in lost, f"{tid}: its lost attempt was not re-dispatched"
        finished = by_task[tid]
        assert finished.attempt is not None and started.attempt is not None
        assert finished.attempt > started.attempt
        assert m.host_of(finished.data["worker"]) is not victim
    victim_done = {ev.id for ev in done if m.host_of(ev.data["worker"]) is victim}
    assert victim_done == victim_done_before, "the cut host recorded a result after its link was cut"
    after = Counter(m.host_of(ev.data["worker"]).hostname for ev in done if ev.id not in victim_done)
    print(
        f"cut {victim.hostname} ({victim.netns}) with {len(stranded)} running tasks "
        f"({sorted(stranded)}); run completed {took:.1f}s after the cut; "
        f"completions by host: {dict(sorted(after.items()))}, on the cut host before the cut: "
        f"{len(victim_done)}"
    )
    assert all(after[h.hostname] > 0 for h in m.hosts.hosts if h is not victim), after
    scheduler_log = c.procs[0].log_text()
    assert "lost with their prefetched messages" in scheduler_log, (
        "the jobs the cut host had prefetched must be re-sent"
    )

    c.kill(m.workers[victim.hostname])  # the unreachable host: no warm shutdown


def _worker_ids(c: Cluster) -> set[str]:
    """Worker ids with a live heartbeat."""
    prefix = c.client.keys.heartbeat_prefix
    return {key[len(prefix) :] for key in c.redis.scan_iter(prefix + "*")}
