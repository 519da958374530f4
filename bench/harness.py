"""Runs every selected engine over every shape on the same Redis with the same worker count.

Only one engine is up while another is measured: an idle engine still burns CPU (an idle Dask
LocalCluster takes ~15% of a core), which would tax whoever runs next to it. Orders:

- "shape" (default): for each shape, each engine in turn is started, runs the shape ``repeat`` times and
  is stopped; the engine order rotates from shape to shape. The engines of one shape are measured minutes
  apart at most, which matters on a shared machine whose load drifts.
- "sequential": one engine at a time, started once for all its shapes (fewer starts, more drift).
- "interleaved": every engine up at once, each shape run on one engine after the other; least drift, but
  idle engines tax the running one.

An engine that cannot start is reported n/a for every shape; a shape an engine cannot express is n/a; a
run that fails or times out is reported as an error and the harness moves on.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any

from bench import redis_floor
from bench.engines import ENGINES, WORKERS, Engine, EngineUnavailable, Measurement, ShapeUnsupported
from bench.shapes import Shape

OK, NA, ERROR = "ok", "n/a", "error"
ORDERS = ("shape", "sequential", "interleaved")


@dataclass
class Outcome:
    """What happened to one (engine, shape): a measurement, or n/a / error with the reason."""

    engine: str
    shape: str
    is_ours: bool
    status: str
    measurement: Measurement | None = None
    reason: str = ""


@dataclass
class Report:
    """Everything one ``python -m bench`` run produced."""

    shapes: list[Shape]
    outcomes: list[Outcome] = field(default_factory=list)
    floor_ms: float | None = None
    floor_error: str = ""
    meta: dict[str, object] = field(default_factory=dict)

    def find(self, engine: str, shape: str) -> Outcome | None:
        return next((o for o in self.outcomes if o.engine == engine and o.shape == shape), None)

    def ours(self, shape: str) -> Measurement | None:
        """Our engine's measurement for ``shape`` when it ran."""
        found = (o.measurement for o in self.outcomes if o.is_ours and o.shape == shape)
        return next((m for m in found if m is not None), None)

    def ratio(self, outcome: Outcome) -> float | None:
        """ours tasks/s divided by this peer's tasks/s (> 1: ours is faster); None without both numbers."""
        ours = self.ours(outcome.shape)
        if outcome.is_ours or ours is None or outcome.measurement is None:
            return None
        return ours.tasks_per_s / outcome.measurement.tasks_per_s


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class _Cell:
    """The samples of one (engine, shape) so far, or why it has none."""

    engine: str
    shape: str
    is_ours: bool
    samples: list[Measurement] = field(default_factory=list)
    final: Outcome | None = None

    def outcome(self) -> Outcome:
        if self.final is not None:
            return self.final
        if not self.samples:
            return Outcome(self.engine, self.shape, self.is_ours, ERROR, reason="not run")
        first, seconds = self.samples[0], [m.seconds for m in self.samples]
        cpus = [m.cpu_s for m in self.samples if m.cpu_s is not None]
        roles: dict[str, list[float]] = {}
        for m in self.samples:
            for role, secs in (m.cpu_roles or {}).items():
                roles.setdefault(role, []).append(secs)
        levels = [m.level for m in self.samples if m.level is not None]
        # The last repeat's note: an engine may sum up every repeat in it (the cached row's medians).
        median = Measurement(
            first.engine,
            first.shape,
            first.tasks,
            statistics.median(seconds),
            note=self.samples[-1].note,
            approximate=first.approximate,
            samples=seconds,
            cpu_s=statistics.median(cpus) if cpus else None,
            cpu_roles={role: statistics.median(v) for role, v in roles.items()} if roles else None,
            # The repeat with the median p50 (its p99 and max with it: one run's figures, not mixed).
            level=sorted(levels, key=lambda s: s.p50_ms)[(len(levels) - 1) // 2] if levels else None,
        )
        return Outcome(self.engine, self.shape, self.is_ours, OK, measurement=median)


def _start(engine: Engine, redis_url: str, workers: int) -> tuple[str, str]:
    """Start ``engine``; ("ok", "") or the status and reason every shape gets when it cannot run."""
    _log(f"starting {engine.name} ({workers} workers)")
    try:
        engine.start(redis_url, workers)
        return OK, ""
    except EngineUnavailable as exc:
        _log(f"{engine.name}: n/a: {exc}")
        status, reason = NA, str(exc)
    except Exception as exc:
        _log(f"{engine.name}: failed to start: {exc!r}\n{traceback.format_exc()}")
        status, reason = ERROR, f"start failed: {exc!r}"
    _stop(engine)
    return status, reason


def _stop(engine: Engine) -> None:
    try:
        engine.stop()
    except Exception as exc:
        _log(f"{engine.name}: stop failed: {exc!r}")


def tree_cpu() -> float | None:
    """CPU seconds (user + system) of this process and every live process under it; None without psutil.

    The engines' schedulers and workers are this process's descendants (our launcher, Dask's
    LocalCluster, the Celery workers' subprocesses), so the difference over a run is what the run cost
    them all. A process that exits during the run takes its CPU with it: the engines keep theirs up.
    """
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def tree_cpu_roles(own_role: str, roots: dict[int, str]) -> dict[str, float] | None:
    """CPU seconds (user + system) of this process tree by role: this process's own as ``own_role``,
    each process under a pid of ``roots`` (itself included) as that root's role, every other
    descendant as ``WORKERS``; None without psutil. What :func:`tree_cpu` sums, split."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    out: dict[str, float] = {}
    try:
        t = me.cpu_times()
        out[own_role] = t.user + t.system
        procs = me.children(recursive=True)
    except psutil.Error:
        return None
    parents: dict[int, int] = {}
    for proc in procs:
        try:
            parents[proc.pid] = proc.ppid()
        except psutil.Error:
            continue
    for proc in procs:
        role, pid = WORKERS, proc.pid
        while pid in parents:  # the nearest root above (or at) it names its role
            if pid in roots:
                role = roots[pid]
                break
            pid = parents[pid]
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def role_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """CPU seconds by role spent between two :func:`tree_cpu_roles` readings."""
    if before is None or after is None:
        return None
    return {role: after[role] - before.get(role, 0.0) for role in after}


def _run_once(engine: Engine, shape: Shape, cell: _Cell, pause: float, label: str) -> None:
    """One timed run into ``cell``; a failure makes the cell final (no further repeats)."""
    time.sleep(pause)
    name, ours = engine.name, engine.is_ours
    try:
        roots = engine.role_roots()
        cpu0, roles0 = tree_cpu(), tree_cpu_roles(engine.own_role, roots)
        m = engine.run(shape)
        cpu1, roles1 = tree_cpu(), tree_cpu_roles(engine.own_role, roots)
        if m.cpu_s is None and cpu0 is not None and cpu1 is not None:
            m = replace(m, cpu_s=cpu1 - cpu0)
        if m.cpu_roles is None:
            m = replace(m, cpu_roles=role_delta(roles0, roles1))
    except (ShapeUnsupported, EngineUnavailable) as exc:
        _log(f"{name} {shape.name}: n/a: {exc}")
        cell.final = Outcome(name, shape.name, ours, NA, reason=str(exc))
        return
    except Exception as exc:
        _log(f"{name} {shape.name}: error: {exc!r}\n{traceback.format_exc()}")
        cell.final = Outcome(name, shape.name, ours, ERROR, reason=repr(exc))
        return
    _log(f"{name} {shape.name} [{label}]: {m.tasks} tasks in {m.seconds:.3f}s = {m.tasks_per_s:.1f} tasks/s")
    cell.samples.append(m)


def run_all(
    engine_names: list[str],
    shapes: list[Shape],
    redis_url: str,
    workers: int,
    repeat: int = 1,
    pause: float = 0.5,
    timeout: float = 300.0,
    floor: bool = True,
    order: str = "shape",
    options: dict[str, Any] | None = None,
) -> Report:
    """Measure the Redis floor, then every engine over every ``shape``, ``repeat`` times (median kept).

    ``options`` are engine attributes (e.g. ``dag_mode``): each engine that has one gets it set.
    """
    if order not in ORDERS:
        raise ValueError(f"order {order!r} not in {ORDERS}")
    report = Report(shapes=shapes)
    if floor:
        try:
            report.floor_ms = redis_floor.one_way_ms(redis_url)
            _log(f"redis floor: {report.floor_ms:.3f} ms one way")
        except Exception as exc:
            report.floor_error = repr(exc)
            _log(f"redis floor failed: {exc!r}")

    cells: dict[tuple[str, str], _Cell] = {}
    engines: list[Engine] = []
    for name in engine_names:
        for s in shapes:
            cells[name, s.name] = _Cell(name, s.name, name == "nerv")
        try:
            engine = ENGINES[name]()
        except ImportError as exc:
            for s in shapes:
                cells[name, s.name].final = Outcome(
                    name, s.name, name == "nerv", NA, reason=f"cannot import the engine ({exc})"
                )
            continue
        engine.timeout = timeout
        for key, value in (options or {}).items():
            if hasattr(engine, key):
                setattr(engine, key, value)
        for s in shapes:
            cells[name, s.name].is_ours = engine.is_ours
        engines.append(engine)

    def fail_all(engine: Engine, status: str, reason: str) -> None:
        for s in shapes:
            cells[engine.name, s.name].final = Outcome(
                engine.name, s.name, engine.is_ours, status, reason=reason
            )

    def attempt(engine: Engine, shape: Shape, i: int) -> None:
        cell = cells[engine.name, shape.name]
        if cell.final is None:
            _run_once(engine, shape, cell, pause, f"{i + 1}/{repeat}")

    for engine in engines:  # n/a up front what an engine says it cannot run: no start needed for it
        for s in shapes:
            if reason := engine.unsupported(s) or (None if engine.is_ours else s.ours_only or None):
                _log(f"{engine.name} {s.name}: n/a: {reason}")
                cells[engine.name, s.name].final = Outcome(
                    engine.name, s.name, engine.is_ours, NA, reason=reason
                )
    # An engine with nothing left to run is never started.
    engines = [e for e in engines if any(cells[e.name, s.name].final is None for s in shapes)]

    def rotate(items: list[Engine], k: int) -> list[Engine]:
        return items[k % len(items) :] + items[: k % len(items)] if items else []

    if order == "shape":
        for k, shape in enumerate(shapes):
            for engine in rotate(engines, k):
                if cells[engine.name, shape.name].final is not None:
                    continue  # could not start earlier: already n/a or error everywhere
                status, reason = _start(engine, redis_url, workers)
                if status != OK:
                    fail_all(engine, status, reason)
                    continue
                try:
                    for i in range(repeat):
                        attempt(engine, shape, i)
                finally:
                    _log(f"stopping {engine.name}")
                    _stop(engine)
    elif order == "sequential":
        for engine in engines:
            status, reason = _start(engine, redis_url, workers)
            if status != OK:
                fail_all(engine, status, reason)
                continue
            try:
                for shape in shapes:
                    for i in range(repeat):
                        attempt(engine, shape, i)
            finally:
                _log(f"stopping {engine.name}")
                _stop(engine)
    else:
        running: list[Engine] = []
        try:
            for engine in engines:
                status, reason = _start(engine, redis_url, workers)
                if status == OK:
                    running.append(engine)
                else:
                    fail_all(engine, status, reason)
            for i in range(repeat):
                for shape in shapes:
                    for engine in rotate(running, i):
                        attempt(engine, shape, i)
        finally:
            for engine in running:
                _log(f"stopping {engine.name}")
                _stop(engine)

    report.outcomes = [cells[name, s.name].outcome() for name in engine_names for s in shapes]
    return report
