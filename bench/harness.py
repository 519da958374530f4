"""Runs every selected engine over every shape, one engine at a time on the same Redis and worker count.

An engine that cannot start is reported n/a for every shape; a shape an engine cannot express is n/a; a
run that fails or times out is reported as an error and the harness moves on.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from bench import redis_floor
from bench.engines import ENGINES, Engine, EngineUnavailable, Measurement, ShapeUnsupported
from bench.shapes import Shape

OK, NA, ERROR = "ok", "n/a", "error"


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


def _median_of(samples: list[Measurement]) -> Measurement:
    first = samples[0]
    seconds = [m.seconds for m in samples]
    return Measurement(first.engine, first.shape, first.tasks, statistics.median(seconds), note=first.note,
                       approximate=first.approximate, samples=seconds)


def run_engine(engine: Engine, shapes: list[Shape], redis_url: str, workers: int, repeat: int,
               pause: float, report: Report) -> None:
    """Start ``engine``, run each shape ``repeat`` times (median kept), stop it; append outcomes."""
    name, ours = engine.name, engine.is_ours

    def all_shapes(status: str, reason: str) -> None:
        report.outcomes.extend(Outcome(name, s.name, ours, status, reason=reason) for s in shapes)

    _log(f"starting {name} ({workers} workers)")
    try:
        engine.start(redis_url, workers)
    except EngineUnavailable as exc:
        _log(f"{name}: n/a: {exc}")
        engine.stop()
        all_shapes(NA, str(exc))
        return
    except Exception as exc:
        _log(f"{name}: failed to start: {exc!r}\n{traceback.format_exc()}")
        engine.stop()
        all_shapes(ERROR, f"start failed: {exc!r}")
        return
    try:
        for shape in shapes:
            report.outcomes.append(_run_shape(engine, shape, repeat, pause))
    finally:
        _log(f"stopping {name}")
        engine.stop()


def _run_shape(engine: Engine, shape: Shape, repeat: int, pause: float) -> Outcome:
    name, ours = engine.name, engine.is_ours
    samples: list[Measurement] = []
    for i in range(repeat):
        time.sleep(pause)
        try:
            m = engine.run(shape)
        except ShapeUnsupported as exc:
            _log(f"{name} {shape.name}: n/a: {exc}")
            return Outcome(name, shape.name, ours, NA, reason=str(exc))
        except EngineUnavailable as exc:
            return Outcome(name, shape.name, ours, NA, reason=str(exc))
        except Exception as exc:
            _log(f"{name} {shape.name}: error: {exc!r}\n{traceback.format_exc()}")
            return Outcome(name, shape.name, ours, ERROR, reason=repr(exc))
        _log(f"{name} {shape.name} [{i + 1}/{repeat}]: {m.tasks} tasks in {m.seconds:.3f}s "
             f"= {m.tasks_per_s:.1f} tasks/s")
        samples.append(m)
    return Outcome(name, shape.name, ours, OK, measurement=_median_of(samples))


def run_all(engine_names: list[str], shapes: list[Shape], redis_url: str, workers: int, repeat: int = 1,
            pause: float = 0.5, timeout: float = 300.0, floor: bool = True,
            options: dict[str, Any] | None = None) -> Report:
    """Measure the Redis floor, then each engine in turn over all ``shapes``.

    ``options`` are engine attributes (e.g. ``dag_mode``): each engine that has one gets it set.
    """
    report = Report(shapes=shapes)
    if floor:
        try:
            report.floor_ms = redis_floor.one_way_ms(redis_url)
            _log(f"redis floor: {report.floor_ms:.3f} ms one way")
        except Exception as exc:
            report.floor_error = repr(exc)
            _log(f"redis floor failed: {exc!r}")
    for name in engine_names:
        try:
            engine = ENGINES[name]()
        except ImportError as exc:
            reason = f"cannot import the engine ({exc})"
            report.outcomes.extend(Outcome(name, s.name, name == "nerv", NA, reason=reason) for s in shapes)
            continue
        engine.timeout = timeout
        for key, value in (options or {}).items():
            if hasattr(engine, key):
                setattr(engine, key, value)
        run_engine(engine, shapes, redis_url, workers, repeat, pause, report)
    return report
