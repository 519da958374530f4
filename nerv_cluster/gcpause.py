"""Pausing the cyclic garbage collector while bulk work builds many objects that hold no cycles.

A collection is triggered by allocations, and each one walks the young objects, and every so often all
of them: building a million-task workflow's definitions, their JSON form and its plan allocates tens of
millions of containers, and the collector's passes over them were a third or more of the time while
finding nothing (task definitions, plans and wire dicts hold no reference cycles). Invariant: the
collector is only ever paused for the duration of a call, and enabled again after it exactly when it
was enabled before (so nesting, and a caller who disabled it for good, are left as they were).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def paused() -> Iterator[None]:
    """No cyclic GC inside the block; the collector's state restored after it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def pausing(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run with the cyclic GC paused (see :func:`paused`)."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with paused():
            return fn(*args, **kwargs)

    return wrapper
