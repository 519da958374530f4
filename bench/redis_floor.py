"""The Redis floor: one-way latency of a message between two processes through Redis lists.

The main process LPUSHes ``ping`` and BRPOPs ``pong``; a child process BRPOPs ``ping`` and LPUSHes ``pong``.
One round trip is two one-way hops, each an LPUSH plus a blocked BRPOP waking up: no task engine on Redis
can hand work from one process to another faster than this.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid

import redis

STOP = b"stop"


def _echo(redis_url: str, ping: str, pong: str) -> None:
    """Child: answer every ping with a pong until told to stop."""
    r = redis.Redis.from_url(redis_url, socket_timeout=None)
    r.lpush(pong, b"ready")
    while True:
        item = r.brpop([ping], timeout=30)
        if item is None or item[1] == STOP:
            return
        r.lpush(pong, item[1])


def one_way_ms(redis_url: str, rounds: int = 2000, warmup: int = 100) -> float:
    """Mean time of ``rounds`` ping-pongs, halved: milliseconds for one hop one way."""
    tag = uuid.uuid4().hex
    ping, pong = f"nerv-bench:floor:{tag}:ping", f"nerv-bench:floor:{tag}:pong"
    r = redis.Redis.from_url(redis_url, socket_timeout=None)
    child = mp.get_context("spawn").Process(target=_echo, args=(redis_url, ping, pong), daemon=True)
    child.start()
    try:
        if r.brpop([pong], timeout=30) is None:
            raise TimeoutError("redis floor echo process did not start")
        for i in range(warmup):
            r.lpush(ping, i)
            r.brpop([pong], timeout=10)
        start = time.perf_counter()
        for i in range(rounds):
            r.lpush(ping, i)
            if r.brpop([pong], timeout=10) is None:
                raise TimeoutError("redis floor echo process stopped answering")
        elapsed = time.perf_counter() - start
    finally:
        r.lpush(ping, STOP)
        child.join(10)
        if child.is_alive():
            child.terminate()
            child.join(5)
        r.delete(ping, pong)
        r.close()
    return 1000.0 * elapsed / rounds / 2
