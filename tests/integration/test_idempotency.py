"""Idempotent submission (issue 11, part 4) through real Redis, a real scheduler and real workers."""

from __future__ import annotations

import threading
from pathlib import Path

import nerv_testtasks as tt
import pytest
from typer.testing import CliRunner

from nerv_cluster import RunStatus, Workflow
from nerv_cluster.cli import app
from nerv_cluster.errors import IdempotencyKeyError
from nerv_cluster.idempotency import run_id_for_key
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.timeout(120)


def _wf(value: int) -> Workflow:
    wf = Workflow("idem")
    wf.add(tt.counted, value, id="only")
    return wf


def test_two_threads_submitting_one_key_get_one_run(cluster: Cluster) -> None:
    key = "nightly-2026-12-01/threads"
    barrier = threading.Barrier(8)
    ids: list[str] = []
    lock = threading.Lock()

    def submit() -> None:
        barrier.wait()
        rid = cluster.client.submit(_wf(1), idempotency_key=key)
        with lock:
            ids.append(rid)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and ids[0] == run_id_for_key(key)
    res = cluster.client.wait(ids[0], timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert cluster.execs(ids[0]) == {"only": 1}
    # One submission in the log and in the runs index: the others wrote nothing.
    entries = cluster.redis.xrange(cluster.client.keys.log(ids[0]))
    assert sum('"WORKFLOW_SUBMITTED"' in fields["e"] for _, fields in entries) == 1


def test_the_same_key_later_returns_the_finished_run_and_runs_nothing(cluster: Cluster) -> None:
    first = cluster.client.submit(_wf(1), idempotency_key="retry-me")
    assert cluster.client.wait(first, timeout=60).status is RunStatus.COMPLETED
    # A different definition under the same key: the existing run, unchanged (documented choice).
    again = cluster.client.submit(_wf(2), idempotency_key="retry-me")
    assert again == first
    (_, fields), *_ = cluster.redis.xrange(cluster.client.keys.log(first), count=1)
    assert '"args":[1]' in fields["e"], "the first definition stands"
    assert cluster.execs(first) == {"only": 1}
    other = cluster.client.submit(_wf(1), idempotency_key="another-key")
    assert other != first
    assert cluster.client.wait(other, timeout=60).status is RunStatus.COMPLETED


def test_bad_keys_are_refused_before_anything_is_written(cluster: Cluster) -> None:
    before = cluster.redis.zcard(cluster.client.keys.runs)
    for bad in ("", "x" * 201, 42):
        with pytest.raises(IdempotencyKeyError):
            cluster.client.submit(_wf(1), idempotency_key=bad)  # type: ignore[arg-type]
    with pytest.raises(IdempotencyKeyError):
        cluster.client.submit(_wf(1), idempotency_key="k", run_id="r")
    assert cluster.redis.zcard(cluster.client.keys.runs) == before


def test_nerv_submit_with_an_idempotency_key_prints_the_same_run(cluster: Cluster, tmp_path: Path) -> None:
    flow = tmp_path / "idem_flow.py"
    flow.write_text(
        "import nerv_testtasks as tt\nfrom nerv_cluster import Workflow\n"
        "workflow = Workflow('idem-cli')\nworkflow.add(tt.counted, 7, id='only')\n"
    )
    env = {"NERV_REDIS_URL": cluster.client.settings.redis_url}
    args = ["submit", str(flow), "--idempotency-key", "cli-key"]
    first = CliRunner().invoke(app, args, env=env)
    second = CliRunner().invoke(app, args, env=env)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    run_id = first.output.strip()
    assert second.output.strip() == run_id == run_id_for_key("cli-key")
    assert cluster.client.wait(run_id, timeout=60).status is RunStatus.COMPLETED
    assert cluster.execs(run_id) == {"only": 1}
