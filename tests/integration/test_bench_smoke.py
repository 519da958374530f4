"""The issue-14 benchmark modules run end to end with tiny sizes through real processes, so they do not
rot: ``bench.scale`` (ours and Dask), ``bench.load`` (ours and Celery canvas, fixed rate and ramp),
``bench`` (the level latency and CPU-by-role columns), ``bench.submit_cost``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_REDIS_URL

REPO = Path(__file__).resolve().parents[2]
#: The benchmarks' database (tests/integration/conftest.py leaves 13 to them).
BENCH_DB = "13"


def _run(module: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", module, "--redis-url", TEST_REDIS_URL, "--redis-db", BENCH_DB, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.timeout(300)
def test_scale_runs_ours_at_two_sizes_and_dask(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    _run("bench.scale", "--n", "1000", "--base", "200", "--shapes", "random", "--json", str(out))
    rows = {(r["engine"], r["tasks"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("nerv", 200), ("nerv", 1000), ("dask", 200), ("dask", 1000)}
    for key in (("nerv", 200), ("nerv", 1000)):
        r = rows[key]
        assert r["status"] == "ok", r
        assert r["tasks_per_s"] > 0 and r["submit_s"] > 0 and r["build_s"] >= 0
        assert r["peak_rss"] > r["idle_rss"] > 0 and r["bytes_per_task"] > 0
        assert r["cpu_us_per_task"]["scheduler"] > 0 and r["cpu_us_per_task"]["workers"] > 0
    dask = rows["dask", 1000]
    assert dask["status"] == "ok", dask
    assert dask["tasks_per_s"] > 0 and dask["peak_rss"] > 0


@pytest.mark.timeout(300)
def test_load_fixed_rate_and_ramp(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    _run("bench.load", "--rate", "20", "--seconds", "2", "--json", str(out))
    steps = {s["engine"]: s for s in json.loads(out.read_text())["steps"]}
    assert set(steps) == {"nerv", "celery-canvas"}
    for s in steps.values():
        assert s["submitted"] == 40 and s["completed"] == 40, s
        assert 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"]
        assert s["achieved_rate"] > 15
    _run("bench.load", "--engines", "nerv", "--ramp", "--ramp-start", "10", "--ramp-factor", "2",
         "--ramp-max", "20", "--step-seconds", "1", "--json", str(out))  # fmt: skip
    data = json.loads(out.read_text())
    assert data["steps"][0]["rate"] == 10
    assert all(s["verdict"] for s in data["steps"])
    assert "nerv" in data["sustained"]


@pytest.mark.timeout(300)
def test_bench_rows_show_level_latency_and_cpu_by_role(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _run("bench", "--engines", "nerv", "--shapes", "chain,random", "--n-scale", "0.05", "--no-floor",
                "--json", str(out))  # fmt: skip
    assert "level p50" in proc.stdout and "sched" in proc.stdout
    results = {r["shape"]: r for r in json.loads(out.read_text())["results"]}
    for shape in ("chain", "random"):
        r = results[shape]
        assert r["status"] == "ok", r
        level = r["level_latency"]
        assert (
            level["count"] > 0
            # (a hand-off's STARTED is dated by the scheduler's clock, Redis's time advanced by the
            # monotonic clock, against the worker's time.time() for the COMPLETED: within a sampling
            # error of each other, see scheduler/clock.py)
            and level["p50_ms"] > -1.0
            and level["clock"] in ("writer", "redis", "writer+redis")
        )
        roles = r["cpu_us_per_task_by_role"]
        # (CPU times tick in 10 ms: a few noop tasks may not add up to one tick in a process)
        assert roles["scheduler"] + roles["workers"] > 0


def test_submit_cost_times_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    _run("bench.submit_cost", "--tasks", "2000", "--repeat", "1", "--json", str(out), timeout=120)
    data = json.loads(out.read_text())
    for stage in ("build", "wire", "validate", "accept", "submit"):
        assert data[stage]["cpu_s"] >= 0 and data[stage]["wall_s"] > 0, stage
