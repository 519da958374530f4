"""Cursors and time travel against a real cluster: events carry their cursor, ``events(after=...)``
resumes right after one, ``status(at=...)`` and ``nerv status --at N`` are the fold up to a point."""

from __future__ import annotations

import json

import nerv_testtasks as tt
import pytest
from typer.testing import CliRunner

from nerv_cluster import EventType, RunStatus, TaskStatus, Workflow
from nerv_cluster.cli import app
from nerv_cluster.errors import CursorError
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.timeout(60)


def test_cursors_resume_and_time_travel(cluster: Cluster) -> None:
    wf = Workflow("history")
    a = wf.add(tt.add, 1, 2)
    b = wf.add(tt.add_io, a, 10)
    wf.add(tt.boom, "no", dependencies=[b], name="fails")
    run_id = cluster.client.submit(wf)
    end = cluster.client.wait(run_id, timeout=30)
    assert end.status is RunStatus.FAILED

    events = list(cluster.client.events(run_id, follow=False))
    cursors = [e.cursor for e in events]
    assert all(cursors) and len(set(cursors)) == len(events)
    assert cursors == [eid for eid, _ in cluster.client.log.read_run(run_id)]

    # Resuming after any cursor gives exactly the rest: no gap, no repeat.
    for k in (0, 3, len(events) - 2):
        rest = list(cluster.client.events(run_id, follow=False, after=cursors[k]))
        assert [e.id for e in rest] == [e.id for e in events[k + 1 :]]

    # The state right after a's completion: a COMPLETED with its result, b not yet, the run RUNNING.
    k = next(i for i, e in enumerate(events) if e.type is EventType.TASK_COMPLETED and e.task_id == a.id)
    then = cluster.client.status(run_id, at=cursors[k])
    assert then.status is RunStatus.RUNNING
    assert then.tasks[a.id].status is TaskStatus.COMPLETED and then.tasks[a.id].result == 3
    assert then.tasks[b.id].status is not TaskStatus.COMPLETED
    assert cluster.client.status(run_id, at=k + 1).tasks == then.tasks  # the first k+1 events
    assert cluster.client.status(run_id, at=cursors[-1]).status is RunStatus.FAILED
    assert cluster.client.status(run_id, at=cursors[-1]).tasks == end.tasks
    with pytest.raises(CursorError):
        cluster.client.status(run_id, at="1-0")  # before the submission
    with pytest.raises(CursorError):
        cluster.client.status(run_id, at="not-a-cursor")

    runner = CliRunner()
    env = {"NERV_REDIS_URL": cluster.client.settings.redis_url}
    out = runner.invoke(app, ["status", run_id, "--at", str(k + 1), "--json"], env=env)
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["status"] == "RUNNING" and doc["tasks"][a.id]["status"] == "COMPLETED"
    out = runner.invoke(app, ["status", run_id, "--at", "1", "--json"], env=env)
    assert json.loads(out.output)["status"] == "PENDING"
