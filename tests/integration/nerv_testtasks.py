"""Task functions the integration tests' workers import (module ``nerv_testtasks``).

Each counted task records its execution in Redis (``HINCRBY test:execs:<run> <task>``), so tests can
check that every task ran exactly once.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis

from nerv_cluster import Cache, Concurrency, RateLimit, Settings, TaskContext, task
from nerv_cluster.client import connect
from nerv_cluster.sentinel import is_sentinel

_client: redis.Redis | None = None
_pid = -1


def _redis() -> redis.Redis:
    global _client, _pid
    if _client is None or _pid != os.getpid():
        url = os.environ["NERV_REDIS_URL"]
        _client = (
            connect(Settings.from_env())
            if is_sentinel(url) or url.startswith("rediss://")
            else redis.Redis.from_url(url, decode_responses=True)
        )
        _pid = os.getpid()
    return _client


def _count(ctx: TaskContext) -> None:
    _redis().hincrby(f"test:execs:{ctx.run_id}", ctx.task_id, 1)


@task(queue="cpu")
def add(x: int, y: int) -> int:
    """x + y on the cpu queue."""
    return x + y


@task(queue="io")
def add_io(x: int, y: int) -> int:
    """x + y on the io queue."""
    return x + y


@task(queue="cpu")
def mul(x: int, y: int) -> int:
    """x * y."""
    return x * y


@task(queue="cpu")
def counted(ctx: TaskContext, *args: Any) -> list[str]:
    """Count this execution; return the ids of the upstream tasks it was given results of."""
    _count(ctx)
    return sorted(ctx.results)


@task(queue="io")
def counted_io(ctx: TaskContext, *args: Any) -> list[str]:
    """counted, on the io queue."""
    _count(ctx)
    return sorted(ctx.results)


@task(queue="cpu")
def slow(ctx: TaskContext, seconds: float) -> float:
    """Sleep, counting the execution."""
    _count(ctx)
    time.sleep(seconds)
    return seconds


@task(queue="cpu")
def slow_waiting(ctx: TaskContext, seconds: float) -> float:
    """Like ``slow``, but waits on an event instead of ``time.sleep``: under Debian's libfaketime 0.9.10
    with ``FAKETIME_DONT_FAKE_MONOTONIC=1`` (the clock-skew tests' workers) ``time.sleep`` fails with
    EINVAL (its absolute monotonic ``clock_nanosleep`` is shifted as if it were wall-clock time)."""
    _count(ctx)
    threading.Event().wait(seconds)
    return seconds


@task(queue="cpu")
def boom(message: str) -> None:
    """Always fails with ValueError(message)."""
    raise ValueError(message)


@task(queue="cpu")
def total(*values: int) -> int:
    """Sum of the values."""
    return sum(values)


@task(queue="io")
def slow_io(ctx: TaskContext, seconds: float) -> float:
    """Sleep on the io queue (threads: no Celery time limits there)."""
    _count(ctx)
    time.sleep(seconds)
    return seconds


@task(queue="cpu")
def slow_marked(ctx: TaskContext, seconds: float) -> float:
    """Sleep, then leave a mark: a task terminated mid-sleep leaves none."""
    _count(ctx)
    time.sleep(seconds)
    _redis().hset(f"test:marks:{ctx.run_id}", ctx.task_id, 1)
    return seconds


@task(queue="cpu")
def suicide(ctx: TaskContext) -> None:
    """Kill the process running it, every time: a poison task."""
    _count(ctx)
    os.kill(os.getpid(), 9)


@task(queue="cpu")
def flaky(ctx: TaskContext, succeed_on: int) -> int:
    """Fail with ConnectionError until attempt ``succeed_on``; return the attempt that succeeded."""
    _count(ctx)
    if ctx.attempt < succeed_on:
        raise ConnectionError(f"attempt {ctx.attempt} fails")
    return ctx.attempt


@task(queue="cpu")
def stubborn(ctx: TaskContext, seconds: float) -> float:
    """Ignore the soft time limit and keep sleeping: only the hard limit stops it."""
    from celery.exceptions import SoftTimeLimitExceeded

    _count(ctx)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            continue
    return seconds


@task(queue="cpu")
def fallback(ctx: TaskContext) -> str:
    """Runs when its upstream failed: returns which upstream tasks it saw results of."""
    return "fallback ran after " + ",".join(sorted(ctx.results)) if ctx.results else "fallback ran"


@task(queue="cpu")
def maybe_fail(ctx: TaskContext, fail: bool) -> str:
    """Fail (RuntimeError) when told to; counted."""
    _count(ctx)
    if fail:
        raise RuntimeError(f"{ctx.task_id} failed on purpose")
    return "ok"


@task(queue="cpu")
def suicide_once(ctx: TaskContext, value: int) -> int:
    """Kill the process running it on the first attempt; return ``value`` on a later one."""
    _count(ctx)
    if ctx.attempt == 1:
        os.kill(os.getpid(), 9)
    return value


@task(queue="cpu")
def blob(size: int) -> str:
    """A result of ``size`` characters (for the job-size bound)."""
    return "b" * size


@task(queue="cpu")
def maybe_suicide(ctx: TaskContext, die: bool, seconds: float = 0.0) -> str:
    """Count, sleep, then kill the process running it if told to (every time: a poison element of a
    fan-out of one function); else return ``ok``."""
    _count(ctx)
    time.sleep(seconds)
    if die:
        os.kill(os.getpid(), 9)
    return "ok"


# -- rerun (issue 16) -------------------------------------------------------------------------------------


@task(queue="cpu")
def broken_until_fixed(ctx: TaskContext, *args: Any) -> str:
    """Count; fail (ValueError) until the test marks the task fixed (``HSET test:fixed:<run> <task> 1``)."""
    _count(ctx)
    if not _redis().hexists(f"test:fixed:{ctx.run_id}", ctx.task_id):
        raise ValueError(f"{ctx.task_id} is broken")
    return f"{ctx.task_id} fixed"


@task(queue="cpu")
def fails_first_runs(ctx: TaskContext, runs: int) -> int:
    """Count; fail (ConnectionError) on each of the first ``runs`` executions; return the execution
    number that succeeded."""
    n = int(_redis().hincrby(f"test:execs:{ctx.run_id}", ctx.task_id, 1))
    if n <= runs:
        raise ConnectionError(f"execution {n} of {ctx.task_id} fails")
    return n


# -- part "cache" (issue 16): cached tasks count their executions per label, across runs --------------


def _count_label(label: str) -> int:
    return int(_redis().incr(f"test:cache:{label}"))


@task(queue="cpu", cache=Cache(ttl=60))
def cached_count(label: str, value: int) -> dict[str, int]:
    """Count this execution under ``label``; return the value and which execution this was."""
    return {"value": value, "execution": _count_label(label)}


@task(queue="cpu", cache=Cache(ttl=60))
def cached_slow(label: str, seconds: float) -> int:
    """Count, sleep, return which execution this was."""
    n = _count_label(label)
    time.sleep(seconds)
    return n


@task(queue="cpu", cache=Cache(ttl=60))
def cached_fails_first(label: str, seconds: float) -> int:
    """Count, sleep, and fail on the first execution under ``label``; later ones return their number."""
    n = _count_label(label)
    time.sleep(seconds)
    if n == 1:
        raise RuntimeError(f"first execution of {label} fails")
    return n


@task(queue="cpu")
def first_arg_key(args: list[Any], kwargs: dict[str, Any]) -> str:
    """A custom cache key: only the first argument matters."""
    return str(args[0])


@task(queue="cpu", cache=Cache(ttl=60, key=first_arg_key))
def cached_by_label(label: str, noise: int) -> int:
    """Count; cached by ``label`` alone (``noise`` does not matter)."""
    return _count_label(label)


# -- child runs (issue 16, part "child") ------------------------------------------------------------------

from nerv_cluster import RetryPolicy, Workflow  # noqa: E402


@task(queue="cpu")
def fib(n: int) -> int | Workflow:
    """Fibonacci by child runs: n < 2 is n, else a child workflow adding fib(n - 1) and fib(n - 2)."""
    if n < 2:
        return n
    child = Workflow(f"fib-{n}")
    child.output(child.add(add, child.add(fib, n - 1), child.add(fib, n - 2)))
    return child


@task(queue="cpu")
def counted_fib(ctx: TaskContext, n: int) -> int | Workflow:
    """fib, counting each execution under its run and task (``test:execs:<run>``) and every call in
    ``test:fibcalls``, with a short pause so a test can kill the scheduler mid-way."""
    _count(ctx)
    _redis().incr("test:fibcalls")
    time.sleep(0.02)
    if n < 2:
        return n
    child = Workflow(f"cfib-{n}")
    child.output(child.add(add, child.add(counted_fib, n - 1), child.add(counted_fib, n - 2)))
    return child


@task(queue="cpu")
def spawn_failing(ctx: TaskContext, message: str) -> Workflow:
    """Returns a child workflow whose task 'bad' fails with ValueError(message); counted."""
    _count(ctx)
    child = Workflow("failing-child")
    child.add(boom, message, id="bad")
    return child


@task(queue="cpu", retry=RetryPolicy(max_retries=2, backoff=0.05))
def spawn_flaky_child(ctx: TaskContext) -> Workflow:
    """Returns a child whose task fails on the first attempt of this task and succeeds after (the task
    is retried as a whole: a new child run per attempt)."""
    _count(ctx)
    child = Workflow("flaky-child")
    child.output(child.add(maybe_fail, ctx.attempt == 1, id="step"))
    return child


@task(queue="cpu")
def spawn_slow(ctx: TaskContext, seconds: float, fan: int) -> Workflow:
    """Returns a child of ``fan`` slow tasks (counted under the child run)."""
    _count(ctx)
    child = Workflow("slow-child")
    for i in range(fan):
        child.add(slow, seconds, id=f"s{i}")
    return child


@task(queue="cpu")
def nest(ctx: TaskContext, levels: int) -> int | Workflow:
    """A chain of child runs ``levels`` deep: each level returns a child running nest(levels - 1)."""
    if levels <= 0:
        return 0
    child = Workflow(f"nest-{levels}")
    child.add(nest, levels - 1)
    return child


@task(queue="cpu")
def spawn_slow_nested(ctx: TaskContext, seconds: float, fan: int, levels: int) -> Workflow:
    """``levels`` child runs deep, the deepest a fan of ``fan`` slow tasks (``spawn_slow``)."""
    if levels <= 1:
        return spawn_slow(ctx, seconds, fan)
    child = Workflow(f"nested-{levels}")
    child.add(spawn_slow_nested, seconds, fan, levels - 1, id="down")
    return child


# -- durable waits (issue 11, part "waits") -----------------------------------------------------------------


@task(queue="io")
def deploy(ctx: TaskContext, approval: Any) -> dict[str, Any]:
    """Count this execution; return the approval (a signal's payload) it was given."""
    _count(ctx)
    return {"deployed": True, "approval": approval}


# -- limits (issue 11, part "limits"): tasks that count how many of them run at once, and when they start --

#: Counts the running executions of a label, and keeps the peak (one atomic step).
_ENTER = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
redis.call('INCR', KEYS[3])
return n
"""


def _enter(label: str) -> None:
    _redis().eval(_ENTER, 3, f"test:lim:{label}:running", f"test:lim:{label}:peak", f"test:lim:{label}:runs")


def _leave(label: str) -> None:
    _redis().decr(f"test:lim:{label}:running")


@task(queue="io", concurrency=Concurrency("crm:{label}", 2))
def limited(label: str, seconds: float) -> int:
    """At most 2 at once per label (key ``crm:<label>``): count while running for ``seconds``."""
    _enter(label)
    try:
        time.sleep(seconds)
    finally:
        _leave(label)
    return 1


@task(queue="io", concurrency=Concurrency("hang:{label}", 1))
def limited_hang(label: str, seconds: float) -> int:
    """One at once per label; the first execution of a label hangs for a minute (its worker is killed
    then), later ones take ``seconds``."""
    first = int(_redis().incr(f"test:lim:{label}:hang")) == 1
    _enter(label)
    try:
        time.sleep(60.0 if first else seconds)
    finally:
        _leave(label)
    return 1


@task(queue="io", rate_limit=RateLimit("test-rate", 5, per=1.0))
def rated(label: str) -> float:
    """At most 5 starts a second cluster-wide: record when this one started."""
    now = time.time()
    _redis().rpush(f"test:rate:{label}", now)
    return now


# -- map (issue 16) ---------------------------------------------------------------------------------------


@task(queue="cpu")
def echo(value: Any) -> Any:
    """Return ``value``: a run-time list (or anything else) for a map to map over."""
    return value


@task(queue="cpu")
def numbers(n: int) -> list[int]:
    """``[0, 1, ..., n - 1]``: a list whose length is known only once this has run."""
    return list(range(n))


@task(queue="cpu")
def square(ctx: TaskContext, x: int, *, fail_on: int = -1, flaky_below: int = -1) -> int:
    """Count, then ``x * x``; ValueError for ``x == fail_on``; ConnectionError on the first attempt for
    ``x < flaky_below`` (a retried element)."""
    _count(ctx)
    if x == fail_on:
        raise ValueError(f"element {x} is bad")
    if x < flaky_below and ctx.attempt == 1:
        raise ConnectionError(f"element {x}: attempt {ctx.attempt} fails")
    return x * x


@task(queue="cpu")
def plus(ctx: TaskContext, x: float, y: float = 1) -> float:
    """Count, then ``x + y``."""
    _count(ctx)
    return x + y


@task(queue="cpu")
def sum_list(values: list[float]) -> float:
    """The sum of a list (a map's result)."""
    return sum(values)


@task(queue="cpu")
def fragile(ctx: TaskContext, x: int, bad: int) -> int:
    """Count, then ``10 * x``; element ``bad`` fails (ValueError) until the test marks it fixed (``HSET
    test:fixed:<run> <task> 1``): a map element that a rerun runs again."""
    _count(ctx)
    if x == bad and not _redis().hexists(f"test:fixed:{ctx.run_id}", ctx.task_id):
        raise ValueError(f"element {x} is broken")
    return 10 * x


# -- idem (issue 11): schedule factories ---------------------------------------------------------------

_PEAK = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


@task(queue="io")
def scheduled(slot: float, label: str = "sched", seconds: float = 0.0) -> Workflow:
    """A schedule's factory: a workflow of one task that counts the slot it was fired for."""
    wf = Workflow(f"scheduled-{label}")
    wf.add(scheduled_body, label, slot, seconds, id="body")
    return wf


@task(queue="io")
def scheduled_body(label: str, slot: float, seconds: float) -> float:
    """Count the slot's execution (``test:sched:<label>:slots``) and the peak of bodies running at once
    (``test:sched:<label>:peak``), running ``seconds``."""
    r = _redis()
    r.eval(_PEAK, 2, f"test:sched:{label}:running", f"test:sched:{label}:peak")
    r.hincrby(f"test:sched:{label}:slots", repr(slot), 1)
    try:
        time.sleep(seconds)
    finally:
        r.decr(f"test:sched:{label}:running")
    return slot


# -- rerun of child runs (issue 16 part 4, "child runs likewise") ------------------------------------------


@task(queue="cpu")
def broken_until_flag(ctx: TaskContext, flag: str, *args: Any) -> str:
    """Count; fail (ValueError) until the test sets ``test:flag:<flag>`` in Redis."""
    _count(ctx)
    if not _redis().exists(f"test:flag:{flag}"):
        raise ValueError(f"{ctx.task_id} is broken until {flag} is set")
    return f"{ctx.task_id} fixed"


@task(queue="cpu")
def spawn_broken_child(ctx: TaskContext, flag: str, levels: int, *args: Any) -> Workflow:
    """Count; return a child run: ``ok`` (counted), then ``bad`` (broken until ``flag`` is set) as its
    output; with ``levels > 1`` the child's second task is ``down``, another such spawn a level deeper."""
    _count(ctx)
    child = Workflow(f"broken-child-{levels}")
    ok = child.add(counted, id="ok")
    if levels > 1:
        child.output(child.add(spawn_broken_child, flag, levels - 1, ok, id="down"))
    else:
        child.output(child.add(broken_until_flag, flag, ok, id="bad"))
    return child
