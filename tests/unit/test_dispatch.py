"""Packing jobs into Celery messages (pure)."""

from __future__ import annotations

from nerv_cluster import constants
from nerv_cluster.jobs import Job
from scheduler.dispatch import deep_backlog, pack


def _job(run: str, i: int, fn: str = "m.f", timeout: float | None = None) -> Job:
    return Job(run_id=run, task_id=f"t{i}", attempt=1, fn=fn, args=[], kwargs={}, timeout=timeout)


def test_without_known_capacity_every_job_travels_alone():
    jobs = [(_job("r", i), "cpu") for i in range(10)]
    assert [len(m) for m, _ in pack(jobs, {})] == [1] * 10


def test_a_big_fan_out_is_packed_but_every_slot_keeps_several_messages():
    jobs = [(_job("r", i), "cpu") for i in range(2000)]
    messages = pack(jobs, {"cpu": 2})
    sizes = [len(m) for m, _ in messages]
    assert max(sizes) == constants.MAX_BATCH
    assert sum(sizes) == 2000 and len(messages) >= 2 * constants.BATCHES_PER_SLOT
    assert [j.task_id for m, _ in messages for j in m] == [f"t{i}" for i in range(2000)], "order kept"


def test_few_jobs_for_many_slots_are_not_packed():
    jobs = [(_job("r", i), "cpu") for i in range(40)]
    assert {len(m) for m, _ in pack(jobs, {"cpu": 16})} == {1}


def test_batches_never_mix_runs_functions_or_queues_and_time_limited_jobs_go_alone():
    jobs = [(_job("a", i), "cpu") for i in range(50)]
    jobs += [(_job("b", i), "cpu") for i in range(50)]
    jobs += [(_job("a", 100 + i, fn="m.g"), "cpu") for i in range(50)]
    jobs += [(_job("a", 200 + i), "io") for i in range(50)]
    jobs += [(_job("a", 300 + i, timeout=5.0), "cpu") for i in range(5)]
    for message, queue in pack(jobs, {"cpu": 1, "io": 1}):
        assert len({(j.run_id, j.fn) for j in message}) == 1
        assert all(j.timeout is None for j in message) or len(message) == 1
        assert queue == ("io" if message[0].task_id in {f"t{200 + i}" for i in range(50)} else "cpu")


def test_jobs_are_held_for_packing_only_behind_a_deep_backlog():
    per_slot = constants.BATCHES_PER_SLOT
    capacity = {"cpu": 2, "io": 8}
    assert not deep_backlog({}, capacity)
    assert not deep_backlog({"cpu": 0}, capacity)
    # A few messages waiting drain in moments: holding would delay the next level of a deep DAG.
    assert not deep_backlog({"cpu": 2 * per_slot - 1}, capacity)
    assert deep_backlog({"cpu": 2 * per_slot}, capacity)
    # Every queue the jobs go to must be backed up.
    assert not deep_backlog({"cpu": 2 * per_slot, "io": 8 * per_slot - 1}, capacity)
    assert deep_backlog({"cpu": 2 * per_slot, "io": 8 * per_slot}, capacity)
    # A queue no worker announced counts as one slot.
    assert deep_backlog({"gpu": per_slot}, capacity)


def test_later_attempts_and_jobs_of_queues_with_a_time_limit_travel_alone():
    # A batch is claimed as a whole, so a loss of its worker is counted against none of its jobs: a
    # later attempt travels alone, where a loss is its own. And a packed job's time limit would count
    # from the batch's claim: jobs of a queue with a default limit travel alone too.
    retried = [(Job("r", f"t{i}", 2, "m.f", [], {}), "cpu") for i in range(40)]
    assert {len(m) for m, _ in pack(retried, {"cpu": 1})} == {1}
    first = [(_job("r", i), "cpu") for i in range(40)]
    assert max(len(m) for m, _ in pack(first, {"cpu": 1})) > 1
    assert {len(m) for m, _ in pack(first, {"cpu": 1}, limited={"cpu"})} == {1}
    assert max(len(m) for m, _ in pack(first, {"cpu": 1}, limited={"io"})) > 1


def test_jobs_of_one_tree_of_child_runs_are_packed_together_and_trees_never_mix():
    """Child runs (issue 16): the many small runs of one recursion share messages; other runs do not."""
    jobs = [(Job(f"child-{i}", "fib", 1, "m.f", [], {}, family="root-a"), "cpu") for i in range(64)]
    jobs += [(Job("root-a", f"t{i}", 1, "m.f", [], {}), "cpu") for i in range(8)]
    jobs += [(Job(f"other-{i}", "fib", 1, "m.f", [], {}, family="root-b"), "cpu") for i in range(64)]
    messages = pack(jobs, {"cpu": 1})
    assert max(len(m) for m, _ in messages) > 1, "one tree's runs share messages"
    for message, _ in messages:
        assert len({j.family or j.run_id for j in message}) == 1, "a message never mixes two trees"
    assert sum(len(m) for m, _ in messages) == len(jobs)
