"""Redis ACL users per role (issue 13, points 2 and 6), through a real redis-server loaded with the
rendered ``users.acl`` (``nerv acl render``; tests/integration/aclredis.py).

Per role what it cannot do (each refusal a ``NOPERM`` error, recorded in the server's ACL log), what
its own code path does under its user (the scheduler takes the lease and leads, a worker consumes,
the console and Flower serve), and the namespaces: team A's users reach nothing of team B's.

Expected to pass only once the client intake and the worker-outcome branches are merged (clients
write only the intake, workers only the feed and their outcomes and claims): the two tests whose
names end in ``_runs_a_workflow`` (a whole cluster under its role users runs a run to COMPLETED).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nerv_testtasks as tt
import pytest
import redis

from nerv_cluster import RunStatus, Settings, Workflow, acl
from nerv_cluster.client import connect
from nerv_cluster.constants import UI_READY_LINE, WORKER_READY_LINE, Keys
from nerv_cluster.embedded import free_port
from nerv_cluster.eventlog import EventLog
from nerv_cluster.model import Event, EventType
from scheduler.lease import Lease
from tests.integration.aclredis import AclRedis
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.timeout(90)

A, B = "team-a", "team-b"
RUN = "run-1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    s = AclRedis(tmp_path_factory.mktemp("acl"), [A, B]).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def fresh(server: AclRedis) -> None:
    """An empty database and ACL log."""
    admin = server.admin()
    admin.flushall()
    admin.acl_log_reset()


@pytest.fixture
def seeded(server: AclRedis) -> None:
    """One run of each team, a message in its queue and a hand-off (written as admin). Not for tests
    with workers: a worker would take the message, which is no Celery message."""
    admin = server.admin()
    for ns in (A, B):
        keys = Keys(ns)
        admin.xadd(keys.log(RUN), {"e": "{}"})
        admin.set(keys.checkpoint(RUN), "{}")
        admin.zadd(keys.runs, {RUN: 1.0})
        admin.rpush(keys.queue("cpu"), "job")
        admin.rpush(keys.handoff("w1"), "job")


def refused(server: AclRedis, call: Callable[[], Any], user: str) -> None:
    """``call`` fails with NOPERM (redis-py's NoPermissionError; inside a script, the script's error
    says NOPERM), and the server's ACL log names ``user`` for it."""
    with pytest.raises(redis.exceptions.ResponseError) as info:
        call()
    error = info.value
    assert isinstance(error, redis.exceptions.NoPermissionError) or "NOPERM" in str(error), error
    assert any(d["username"] == user for d in server.denials()), server.denials()[:3]


def log_of(server: AclRedis, ns: str, role: str) -> EventLog:
    """The library's own event log (its scripts) connected as ``role``."""
    settings = Settings.from_env({}, redis_url=server.url(ns, role), prefix=ns, redis_retries=0)
    return EventLog(connect(settings), Keys(ns))


def submitted(run_id: str) -> Event:
    return Event(EventType.WORKFLOW_SUBMITTED, run_id, data={"workflow": {"name": "x", "tasks": []}})


# -- the rendered file ----------------------------------------------------------------------------------


def test_every_role_has_its_own_user_and_default_is_off(server: AclRedis) -> None:
    listed = {line.split()[1]: line for line in server.admin().acl_list()}
    for ns in (A, B):
        for role in acl.ROLES:
            assert acl.user_name(ns, role) in listed
    assert " off " in listed["default"] + " "
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=server.port).ping()  # nobody gets in as default
    assert all(line.split()[2] == "on" for name, line in listed.items() if name != "default")
    # No password in the file, only hashes.
    assert not any(pw in server.text for pw in server.passwords.values())


# -- client ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("seeded")
def test_client_cannot_write_a_run_log_a_queue_the_lease_or_the_feed(server: AclRedis) -> None:
    user, _ = server.user(A, "client")
    r, k = server.as_role(A, "client"), Keys(A)
    refused(server, lambda: r.xadd(k.log(RUN), {"e": "{}"}), user)
    refused(server, lambda: log_of(server, A, "client").submit(submitted("run-2")), user)
    refused(server, lambda: r.lpush(k.queue("cpu"), "job"), user)
    refused(server, lambda: r.delete(k.queue("cpu")), user)
    refused(server, lambda: r.set(k.lease, "x"), user)
    refused(server, lambda: Lease(log_of(server, A, "client")).acquire(), user)
    refused(server, lambda: r.xadd(k.feed, {"e": "{}"}), user)
    refused(server, lambda: r.set(k.checkpoint(RUN), "{}"), user)
    refused(server, lambda: r.lpush(k.handoff("w1"), "job"), user)
    refused(server, lambda: r.get(k.claim_secret), user)  # what attempt tokens are minted with
    # What a client does: read runs, ask through the intake, take its reply.
    assert r.xrange(k.log(RUN)) and r.get(k.checkpoint(RUN)) == "{}" and r.zrange(k.runs, 0, -1) == [RUN]
    assert r.xadd(f"{A}:intake", {"request": "{}"})
    server.admin().rpush(f"{A}:intake:reply:req-1", "ok")
    assert r.blpop([f"{A}:intake:reply:req-1"], timeout=1) == (f"{A}:intake:reply:req-1", "ok")
    assert r.delete(f"{A}:intake:reply:req-1") == 0


@pytest.mark.usefixtures("seeded")
def test_console_reads_runs_and_only_appends_to_the_intake(server: AclRedis) -> None:
    user, _ = server.user(A, "console")
    r, k = server.as_role(A, "console"), Keys(A)
    assert r.xrange(k.log(RUN)) and r.get(k.checkpoint(RUN)) == "{}"
    assert r.xadd(f"{A}:intake", {"request": "{}"})
    refused(server, lambda: r.xadd(k.log(RUN), {"e": "{}"}), user)
    refused(server, lambda: r.xadd(k.feed, {"e": "{}"}), user)  # cancel/rerun/signal: intake requests
    refused(server, lambda: r.set(k.lease, "x"), user)
    refused(server, lambda: r.lpush(k.queue("cpu"), "job"), user)
    refused(server, lambda: r.zadd(k.runs, {"run-9": 2.0}), user)


# -- worker ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("seeded")
def test_worker_cannot_take_the_lease_write_a_run_log_a_definition_or_a_checkpoint(server: AclRedis) -> None:
    user, _ = server.user(A, "worker")
    r, k = server.as_role(A, "worker"), Keys(A)
    refused(server, lambda: r.set(k.lease, "x"), user)
    refused(server, lambda: r.incr(k.epoch), user)
    refused(server, lambda: Lease(log_of(server, A, "worker")).acquire(), user)
    refused(server, lambda: r.xadd(k.log(RUN), {"e": "{}"}), user)
    refused(server, lambda: log_of(server, A, "worker").submit(submitted("run-3")), user)  # a definition
    refused(server, lambda: r.set(k.checkpoint(RUN), "{}"), user)
    refused(server, lambda: log_of(server, A, "worker").write_checkpoint(RUN, {}), user)
    refused(server, lambda: r.lpush(k.handoff("w2"), "job"), user)  # no job pushed to a waiting worker
    refused(server, lambda: r.set(k.cache_entry("f", "0" * 64), "x"), user)
    refused(server, lambda: r.delete(k.feed), user)
    refused(server, lambda: r.set(k.feed, "x"), user)
    # The secret attempt tokens are minted with: a worker holding it could complete any attempt.
    server.admin().set(k.claim_secret, "s" * 64)
    refused(server, lambda: r.get(k.claim_secret), user)
    assert server.as_role(A, "scheduler").get(k.claim_secret) == "s" * 64
    # A run's pub/sub channel: only the scheduler announces a run's events.
    refused(server, lambda: r.publish(k.channel(RUN), "{}"), user)
    # What a worker does: read definitions, record outcomes and claims, tell the scheduler, take a
    # hand-off, stay alive, use Celery's keys.
    assert r.xrange(k.log(RUN))
    assert r.xadd(k.feed, {"e": "{}"})
    assert r.hset(k.outcomes(RUN), "a:1", "{}") == 1 and r.hset(k.claims(RUN), "a:1", "w1") == 1
    assert r.lpop(k.handoff("w1")) == "job"
    assert r.set(k.heartbeat("w1"), "{}", px=5000) and r.hset(k.workers, "w1", "{}") == 1
    assert r.lpush(k.queue("io"), "m") == 1 and r.rpop(k.queue("cpu")) == "job"


# -- flower ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("seeded")
def test_flower_only_reads(server: AclRedis) -> None:
    user, _ = server.user(A, "flower")
    r, k = server.as_role(A, "flower"), Keys(A)
    assert r.llen(k.queue("cpu")) == 1  # its broker tab
    writes: list[Callable[[], Any]] = [
        lambda: r.xadd(k.log(RUN), {"e": "{}"}),
        lambda: r.xadd(k.feed, {"e": "{}"}),
        lambda: r.xadd(f"{A}:intake", {"request": "{}"}),
        lambda: r.set(k.lease, "x"),
        lambda: r.hset(k.outcomes(RUN), "a:1", "{}"),
        lambda: r.lpush(k.queue("cpu"), "job"),
        lambda: r.rpop(k.queue("cpu")),
        lambda: r.delete(k.queue("cpu")),
        lambda: r.set(k.celery + "unacked_mutex", "x"),
        lambda: r.hset(k.celery + "unacked", "tag", "m"),
        lambda: r.srem(k.celery + "_kombu.binding.celery", "cpu"),
    ]
    for write in writes:
        refused(server, write, user)
    refused(server, lambda: r.xrange(k.log(RUN)), user)  # not even nerv's state to read


# -- keda -----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("seeded")
def test_keda_reads_only_queue_lengths(server: AclRedis) -> None:
    user, _ = server.user(A, "keda")
    r, k = server.as_role(A, "keda"), Keys(A)
    assert r.llen(k.queue("cpu")) == 1
    refused(server, lambda: r.lrange(k.queue("cpu"), 0, -1), user)
    refused(server, lambda: r.rpop(k.queue("cpu")), user)


# -- namespaces -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["client", "console", "worker", "scheduler", "flower"])
@pytest.mark.usefixtures("seeded")
def test_team_a_cannot_reach_team_b(server: AclRedis, role: str) -> None:
    user, _ = server.user(A, role)
    r, kb = server.as_role(A, role), Keys(B)
    refused(server, lambda: r.xrange(kb.log(RUN)), user)
    refused(server, lambda: r.get(kb.checkpoint(RUN)), user)
    refused(server, lambda: r.llen(kb.queue("cpu")), user)
    refused(server, lambda: r.lrange(kb.queue("cpu"), 0, -1), user)
    refused(server, lambda: r.zrange(kb.runs, 0, -1), user)
    refused(server, lambda: r.brpop([kb.queue("cpu")], timeout=1), user)
    if role != "scheduler":  # SCAN names keys of every namespace: only the scheduler (cache clearing) has it
        refused(server, lambda: r.execute_command("SCAN", 0, "MATCH", f"{B}:*"), user)
    p = r.pubsub()
    with pytest.raises(redis.exceptions.NoPermissionError):
        p.subscribe(kb.channel(RUN))
        p.get_message(timeout=1)
    p.close()


# -- the real processes under their users ---------------------------------------------------------------


def _role_env(server: AclRedis, ns: str, role: str) -> dict[str, str]:
    """A process's environment for ``role``: its user through NERV_REDIS_USERNAME / _PASSWORD (the
    settings' way, as the deploy files do it), the namespace through NERV_NAMESPACE."""
    name, password = server.user(ns, role)
    return {
        "NERV_REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
        "NERV_REDIS_USERNAME": name,
        "NERV_REDIS_PASSWORD": password,
        "NERV_NAMESPACE": ns,
        "NERV_PREFIX": "",
    }


def _cluster(server: AclRedis, ns: str, logdir: Path) -> Cluster:
    """A cluster of namespace ``ns`` whose test-side client connects as the namespace's client."""
    return Cluster(server.url(ns, "client"), logdir, NERV_NAMESPACE=ns, NERV_PREFIX="")


def _start(c: Cluster, server: AclRedis, ns: str, queues: str = "cpu") -> None:
    c.spawn("scheduler", "scheduler", env=_role_env(server, ns, "scheduler"))
    deadline = time.monotonic() + 20
    admin = server.admin()
    while not admin.get(Keys(ns).lease):
        assert time.monotonic() < deadline, c.tail(c.procs[0])
        time.sleep(0.05)
    args = ("worker", "--queues", queues, "--concurrency", "2")
    w = c.spawn(f"worker-{queues}", *args, env=_role_env(server, ns, "worker"))
    c.wait_log(w, WORKER_READY_LINE, timeout=30)


def test_scheduler_and_worker_start_under_their_users(server: AclRedis, tmp_path: Path) -> None:
    """The scheduler takes the lease and leads, a worker connects its Celery consumer (queues,
    bindings, pidbox) and registers, each under its own user, with no refusal in the ACL log."""
    c = _cluster(server, A, tmp_path)
    try:
        _start(c, server, A)
        admin, k = server.admin(), Keys(A)
        assert admin.hgetall(k.workers) and admin.hgetall(k.registry)
        time.sleep(1.5)  # a few loop rounds and heartbeats
        denied = [d for d in server.denials() if d["username"] in {f"{A}-scheduler", f"{A}-worker"}]
        assert not denied, denied
        for s in c.procs:
            assert s.proc.poll() is None, c.tail(s)
    finally:
        c.stop()


def test_console_serves_runs_under_its_user(server: AclRedis, tmp_path: Path) -> None:
    port = free_port()
    c = Cluster(server.url(A, "console"), tmp_path)
    try:
        ui = c.spawn(
            "console", "ui", "--host", "127.0.0.1", "--port", str(port), env=_role_env(server, A, "console")
        )
        c.wait_log(ui, UI_READY_LINE, timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=10) as resp:
            body = json.loads(resp.read())
        assert resp.status == 200, body
        assert not [d for d in server.denials() if d["username"] == f"{A}-console"], server.denials()
    finally:
        c.stop()


def test_flower_watches_under_its_user(server: AclRedis, tmp_path: Path) -> None:
    """Flower's event receiver and broker tab work as the flower user (it writes only kombu's
    bookkeeping of its own queues): a worker it did not start shows up in its API."""
    c = _cluster(server, A, tmp_path)
    port = free_port()
    try:
        _start(c, server, A)
        env = {**_role_env(server, A, "flower"), "NERV_BROKER_RESTORE": "0"}
        c.spawn(
            "flower", "--app", "worker.app:app", "flower", f"--port={port}", "--address=127.0.0.1",
            "--basic-auth=u:p", command=[sys.executable, "-m", "celery"], env=env,
        )  # fmt: skip
        auth = {"Authorization": "Basic dTpw"}

        def workers() -> Any:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/workers?refresh=1", headers=auth)
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())

        deadline, seen = time.monotonic() + 40, None
        while time.monotonic() < deadline:
            try:
                seen = workers()
                if seen:
                    break
            except (OSError, ValueError, urllib.error.URLError) as exc:
                seen = exc
            time.sleep(0.5)
        assert seen and isinstance(seen, dict), (seen, c.tail(c.procs[-1]))
        writes = [d for d in server.denials() if d["username"] == f"{A}-flower"]
        assert not writes, writes
    finally:
        c.stop()


def _fan_in(name: str) -> tuple[Workflow, int]:
    wf = Workflow(name)
    parts = [wf.add(tt.add, i, 1, id=f"add-{i}") for i in range(5)]
    wf.add(tt.total, *parts, id="total")
    return wf, sum(i + 1 for i in range(5))


def test_whole_cluster_under_its_role_users_runs_a_workflow(server: AclRedis, tmp_path: Path) -> None:
    """Expected to pass after the intake and outcome branches are merged (see the module docstring)."""
    c = _cluster(server, A, tmp_path)
    try:
        _start(c, server, A)
        wf, expected = _fan_in("acl-fan-in")
        rid = c.client.submit(wf)
        run = c.client.wait(rid, timeout=40)
        assert run.status is RunStatus.COMPLETED, run
        assert run.tasks["total"].result == expected
        assert not [d for d in server.denials() if str(d["username"]).startswith(A)], server.denials()
    finally:
        c.stop()


def test_two_namespaces_on_one_redis_each_runs_a_workflow(server: AclRedis, tmp_path: Path) -> None:
    """Team A's and team B's clusters, each under its own users, each run their own run; neither's
    users were refused anything (so nothing reached across). Expected to pass after the merge."""
    clusters = {ns: _cluster(server, ns, tmp_path / ns) for ns in (A, B)}
    try:
        for ns, c in clusters.items():
            _start(c, server, ns)
        runs = {ns: c.client.submit(_fan_in(f"{ns}-run")[0]) for ns, c in clusters.items()}
        for ns, c in clusters.items():
            assert c.client.wait(runs[ns], timeout=40).status is RunStatus.COMPLETED
        admin = server.admin()
        assert admin.exists(Keys(A).log(runs[A])) and not admin.exists(Keys(B).log(runs[A]))
        assert not server.denials(), server.denials()
    finally:
        for c in clusters.values():
            c.stop()
