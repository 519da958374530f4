"""The engine interface the harness drives, the registry of engines, and the slot for ours (``NervEngine``).

An engine is started once, runs every shape, and is stopped::

    engine.start(redis_url, workers)   # bring up its processes on that Redis with that many workers
    m = engine.run(shape)              # build + submit the shape's DAG of noops, wait for all of it
    engine.stop()                      # tear everything down, even after a failed run

``run`` times itself with ``Stopwatch``: the clock starts before the client builds anything for this run and
stops when the client has observed that every task finished. Per-run setup that is not submission (making
a key name, flushing a counter) happens before the clock. ``run`` raises ``ShapeUnsupported`` for a shape
the engine cannot express; ``start`` raises ``EngineUnavailable`` when the engine cannot run at all.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.latency import Summary
from bench.shapes import Shape

#: Process roles CPU time is split by: the bench process itself (the engine's client; for Dask also
#: its scheduler, which runs in the client's process), the engine's scheduler process(es), and the
#: processes that run tasks.
CLIENT, SCHEDULER, WORKERS = "client", "scheduler", "workers"
ROLES = (CLIENT, SCHEDULER, WORKERS)

#: Environment variable carrying the bench's Redis URL (with DB) to the peers' processes.
BENCH_URL_ENV = "NERV_BENCH_REDIS_URL"


class BenchError(Exception):
    """Base of the harness's own errors."""


class EngineUnavailable(BenchError):
    """The engine cannot run here (not built yet, a dependency missing); every shape is reported n/a."""


class ShapeUnsupported(BenchError):
    """The engine cannot express this shape (e.g. a general DAG in Celery canvas); reported n/a."""


@dataclass
class Measurement:
    """One timed run of one shape on one engine."""

    engine: str
    shape: str
    tasks: int
    seconds: float
    #: How the engine expressed the shape when it is not the plain DAG (e.g. "chain of groups per layer").
    note: str = ""
    #: True when the engine ran a different (e.g. over-synchronized) graph than the shape describes.
    approximate: bool = False
    #: Every sample's wall time when the run was repeated; ``seconds`` is their median.
    samples: list[float] = field(default_factory=list)
    #: CPU seconds the run cost: the bench process (the engine's client) and every process under it
    #: (the engine's scheduler and workers), user plus system; None when it could not be read. On a
    #: shared machine this is the figure other work moves least (wall time counts their turns too).
    cpu_s: float | None = None
    #: The same CPU seconds by process role (``ROLES``: the client, the engine's scheduler, its
    #: workers); a role the engine has no process for is absent. None when it could not be read.
    cpu_roles: dict[str, float] | None = None
    #: Level latency (issue 14, goal 1): each task's STARTED minus the latest COMPLETED of its
    #: dependencies, from the run's log (``bench.latency``); None for an engine or shape without it.
    level: Summary | None = None

    @property
    def cpu_us_per_task(self) -> float | None:
        """CPU microseconds per task, all of the engine's processes together."""
        return None if self.cpu_s is None or not self.tasks else 1e6 * self.cpu_s / self.tasks

    def role_us_per_task(self, role: str) -> float | None:
        """CPU microseconds per task of the processes of one role (None when not measured or absent)."""
        if self.cpu_roles is None or role not in self.cpu_roles or not self.tasks:
            return None
        return 1e6 * self.cpu_roles[role] / self.tasks

    @property
    def tasks_per_s(self) -> float:
        """Throughput over the whole run."""
        return self.tasks / self.seconds if self.seconds > 0 else float("inf")

    @property
    def ms_per_task(self) -> float:
        """Wall time divided by the task count: for a chain this is the cost of one hop."""
        return 1000.0 * self.seconds / self.tasks if self.tasks else 0.0


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``; monotonic, high resolution."""

    def __init__(self) -> None:
        self.started = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


class Engine(ABC):
    """One system under test. Subclasses set ``name`` and implement the three methods."""

    name: str = "engine"
    #: Shown in the report next to the engine name.
    description: str = ""
    #: True for the engine the ratios are computed for (ours); peers leave it False.
    is_ours: bool = False

    #: The role of the bench process's own CPU (the client's; Dask's scheduler runs in it too).
    own_role: str = CLIENT

    def __init__(self, timeout: float = 300.0) -> None:
        #: Longest a single run may take before it is abandoned with ``TimeoutError``.
        self.timeout = timeout

    def role_roots(self) -> dict[int, str]:
        """pid -> role for processes under the bench process whose subtree has a role other than
        workers (ours: the scheduler service); every other descendant counts as a worker."""
        return {}

    @abstractmethod
    def start(self, redis_url: str, workers: int) -> None:
        """Start the engine on ``redis_url`` with ``workers`` worker processes; return once it is ready."""

    def unsupported(self, shape: Shape) -> str | None:
        """Why this engine cannot run ``shape`` (reported n/a without starting it), or None."""
        return None

    @abstractmethod
    def run(self, shape: Shape) -> Measurement:
        """Run ``shape`` once (all noops) and return the timed measurement."""

    @abstractmethod
    def stop(self) -> None:
        """Stop every process the engine started; safe to call twice or after a failed ``start``.

        The harness may ``start`` the same engine object again after ``stop`` (once per shape).
        """


def _nerv() -> Engine:
    from bench.nerv_engine import NervEngine

    return NervEngine()


def _celery_canvas() -> Engine:
    from bench.celery_engines import CeleryCanvasEngine

    return CeleryCanvasEngine()


def _celery_raw() -> Engine:
    from bench.celery_engines import CeleryRawEngine

    return CeleryRawEngine()


def _dask() -> Engine:
    from bench.dask_engine import DaskEngine

    return DaskEngine()


#: Engine factories by CLI name, in report order (ours first). Imports are lazy so a missing peer
#: library only disables that peer.
ENGINES: dict[str, Callable[[], Engine]] = {
    "nerv": _nerv,
    "celery-canvas": _celery_canvas,
    "celery-raw": _celery_raw,
    "dask": _dask,
}

#: CLI shorthands that stand for several engines.
ALIASES: dict[str, tuple[str, ...]] = {
    "celery": ("celery-canvas", "celery-raw"),
    "ours": ("nerv",),
    "peers": ("celery-canvas", "celery-raw", "dask"),
    "all": tuple(ENGINES),
}


def resolve(names: list[str]) -> list[str]:
    """Expand aliases, drop duplicates, keep registry order; unknown names raise ``ValueError``."""
    wanted: set[str] = set()
    for name in names:
        if name in ALIASES:
            wanted.update(ALIASES[name])
        elif name in ENGINES:
            wanted.add(name)
        else:
            known = ", ".join([*ENGINES, *ALIASES])
            raise ValueError(f"unknown engine {name!r}; known: {known}")
    return [n for n in ENGINES if n in wanted]
