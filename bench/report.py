"""Turns a ``Report`` into the printed table and the JSON file."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from bench.engines import CLIENT, ROLES, SCHEDULER, WORKERS, Measurement
from bench.harness import NA, OK, Outcome, Report


def _num(value: float | None, fmt: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    return format(value, fmt)


def _ratio_text(report: Report, o: Outcome) -> str:
    if o.is_ours:
        return ""
    ratio = report.ratio(o)
    if ratio is None:
        return "n/a"
    approx = "~" if o.measurement is not None and o.measurement.approximate else ""
    return f"{approx}{ratio:.2f}x"


def _spread(samples: list[float]) -> str:
    """(slowest - fastest) / median of the repeats, in percent; empty for a single run."""
    if len(samples) < 2:
        return ""
    return f"{100 * (max(samples) - min(samples)) / statistics.median(samples):.0f}%"


def _role(m: Measurement, role: str) -> str:
    value = m.role_us_per_task(role)
    return "-" if value is None else _num(value, ".0f")


def _level(m: Measurement, which: str) -> str:
    if m.level is None:
        return "-"
    return _num(m.level.p50_ms if which == "p50" else m.level.p99_ms, ".2f")


def rows(report: Report) -> list[list[str]]:
    """One row per (shape, engine): tasks, wall s, spread, tasks/s, CPU per task (all, then by role:
    scheduler, workers, client), ms/hop (chain), level latency p50 / p99, ours/peer, how."""
    out: list[list[str]] = []
    kinds = {s.name: s.kind for s in report.shapes}
    for shape in report.shapes:
        for o in (o for o in report.outcomes if o.shape == shape.name):
            m = o.measurement
            if o.status == OK and m is not None:
                hop = _num(m.ms_per_task, ".2f") if kinds.get(o.shape) == "chain" else "-"
                out.append(
                    [
                        o.shape,
                        o.engine,
                        str(m.tasks),
                        _num(m.seconds, ".3f"),
                        _spread(m.samples),
                        _num(m.tasks_per_s, ".1f"),
                        "-" if m.cpu_us_per_task is None else _num(m.cpu_us_per_task, ".0f"),
                        _role(m, SCHEDULER),
                        _role(m, WORKERS),
                        _role(m, CLIENT),
                        hop,
                        _level(m, "p50"),
                        _level(m, "p99"),
                        _ratio_text(report, o),
                        m.note,
                    ]
                )
            else:
                label = "n/a" if o.status == NA else "ERROR"
                reason = o.reason if len(o.reason) <= 70 else o.reason[:67] + "..."
                out.append(
                    [
                        o.shape,
                        o.engine,
                        "-",
                        "-",
                        "",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "" if o.is_ours else "n/a",
                        f"{label} ({reason})",
                    ]
                )
    return out


HEADER = [
    "shape", "engine", "tasks", "wall s", "spread", "tasks/s", "cpu us/task", "sched", "workers", "client",
    "ms/hop", "level p50", "level p99", "ours/peer", "how",
]  # fmt: skip
RIGHT = set(range(2, 14))


def table(report: Report) -> str:
    """The aligned text table with a footer for the Redis floor and how to read the ratio."""
    body = rows(report)
    widths = [max(len(r[i]) for r in [HEADER, *body]) for i in range(len(HEADER))]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        parts = [c.rjust(w) if i in RIGHT else c.ljust(w) for i, (c, w) in pairs]
        return "  ".join(parts).rstrip()

    lines = [line(HEADER), line(["-" * w for w in widths])]
    previous = None
    for r in body:
        if previous is not None and r[0] != previous:
            lines.append("")
        lines.append(line(r))
        previous = r[0]
    lines.append("")
    if report.floor_ms is not None:
        lines.append(
            f"Redis floor (LPUSH/BRPOP ping-pong between two processes): {report.floor_ms:.3f} ms one way"
        )
    elif report.floor_error:
        lines.append(f"Redis floor: error ({report.floor_error})")
    lines.append(
        "ours/peer = our tasks/s / the peer's tasks/s, same shape, same run (> 1: ours is faster); "
        "~ = the peer ran an approximation of the shape (see 'how')."
    )
    lines.append(
        "wall s = median of the repeats; spread = (slowest - fastest) / median; "
        "ms/hop = wall time / tasks, for the chain."
    )
    lines.append(
        "cpu us/task = CPU microseconds per task of the bench process (the client) and every process under "
        "it (the engine's scheduler and workers), median of the repeats; Redis not included. sched / "
        "workers / client = the same split by process role (Dask's scheduler runs in the bench process: "
        "its sched includes its client; Celery has no scheduler process)."
    )
    lines.append(
        "level p50 / p99 = ms from the latest upstream TASK_COMPLETED to the downstream TASK_STARTED, per "
        "task with dependencies, from the run's log (ours; the clock is in the JSON: 'writer' = the "
        "events' own timestamps, 'redis' = the log entries' ids)."
    )
    return "\n".join(lines)


def to_json(report: Report) -> dict[str, Any]:
    """Plain JSON-able dict: meta, shapes, floor, every outcome with its ratio, and a ratios matrix."""
    results: list[dict[str, Any]] = []
    ratios: dict[str, dict[str, float | None]] = {}
    for o in report.outcomes:
        m = o.measurement
        entry: dict[str, Any] = {
            "engine": o.engine,
            "shape": o.shape,
            "ours": o.is_ours,
            "status": o.status,
            "reason": o.reason,
        }
        if m is not None:
            entry.update(
                tasks=m.tasks,
                seconds=m.seconds,
                tasks_per_s=m.tasks_per_s,
                ms_per_task=m.ms_per_task,
                note=m.note,
                approximate=m.approximate,
                samples=m.samples,
                cpu_s=m.cpu_s,
                cpu_us_per_task=m.cpu_us_per_task,
                cpu_us_per_task_by_role={
                    role: m.role_us_per_task(role) for role in ROLES if m.role_us_per_task(role) is not None
                },
                level_latency=None if m.level is None else m.level.to_dict(),
            )
        if not o.is_ours:
            entry["ours_over_peer"] = report.ratio(o)
            ratios.setdefault(o.shape, {})[o.engine] = report.ratio(o)
        results.append(entry)
    return {
        "meta": report.meta,
        "redis_floor_ms_one_way": report.floor_ms,
        "shapes": {
            s.name: {
                "tasks": s.size,
                "edges": s.edges,
                "depth": s.depth,
                "kind": s.kind,
                "description": s.description,
                "params": s.params,
            }
            for s in report.shapes
        },
        "results": results,
        "ratios_ours_over_peer": ratios,
    }


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(report), indent=2, sort_keys=False) + "\n")
