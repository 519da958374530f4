"""The Celery app and noop tasks of the Celery peers; the worker runs ``celery -A bench.celery_peer worker``.

Broker and result backend are both the Redis at ``NERV_BENCH_REDIS_URL`` (the bench's own DB), which is
what canvas chords need. Each engine has its own queue (canvas work defaults to ``CANVAS_QUEUE``), so
nothing collides with other Celery users, nor the two engines with each other when both are up. The
``count``/``hop``/``join`` tasks are the fire-and-forget floor: no results stored, completion reported by
a Redis counter and a ``done`` list the client blocks on.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

from bench.engines import BENCH_URL_ENV as URL_ENV

DEFAULT_URL = "redis://127.0.0.1:6379/13"
#: The queues of the bench's Celery workers: one per engine.
CANVAS_QUEUE = "nerv-bench-canvas"
RAW_QUEUE = "nerv-bench-raw"

URL = os.environ.get(URL_ENV, DEFAULT_URL)

app = Celery("nerv_bench", broker=URL, backend=URL)
app.conf.update(
    task_default_queue=CANVAS_QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    """One Redis connection per worker process, made on first use (after the prefork fork)."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(URL, socket_timeout=None)
    return _client


def done_key(run_key: str) -> str:
    """The list the client BRPOPs on to learn that run ``run_key`` finished."""
    return f"{run_key}:done"


@app.task(name="bench.noop")
def noop(*args: Any, **kwargs: Any) -> None:
    """Do nothing; the result (None) is stored in the result backend."""
    return None


@app.task(name="bench.count", ignore_result=True)
def count(run_key: str, n: int, queue: str, then: str | None = None) -> None:
    """Count one finished task of ``n``; the last one signals done, or first sends task ``then``."""
    if _redis().incr(run_key) == n:
        if then is None:
            _redis().lpush(done_key(run_key), 1)
        else:
            app.send_task(then, args=(run_key,), queue=queue, ignore_result=True)


@app.task(name="bench.hop", ignore_result=True)
def hop(run_key: str, remaining: int, queue: str) -> None:
    """One link of a self-sending chain: send the next hop, or signal done after the last."""
    if remaining <= 1:
        _redis().lpush(done_key(run_key), 1)
    else:
        app.send_task("bench.hop", args=(run_key, remaining - 1, queue), queue=queue, ignore_result=True)


@app.task(name="bench.join", ignore_result=True)
def join(run_key: str) -> None:
    """The fan-in task of the raw floor: signal done."""
    _redis().lpush(done_key(run_key), 1)
