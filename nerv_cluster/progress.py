"""Showing runs in a terminal: live progress of a run, and tables for status, plans and recent runs.

:func:`watch` reads a run's event log from the start, then follows it (as ``Client.events`` does),
folding each event with the same pure ``apply`` the scheduler uses, so what it shows is exactly the
state the log describes. Nothing here writes to Redis.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from nerv_cluster import mapping
from nerv_cluster import state as st
from nerv_cluster.client import Client
from nerv_cluster.errors import RunNotFoundError
from nerv_cluster.model import RunStatus, TaskStatus
from nerv_cluster.planner import Plan
from nerv_cluster.workflow import Workflow

#: How long one blocking read of the log waits before the loop checks its deadline.
_BLOCK_MS = 500
#: A run still PENDING after this long gets a hint that no scheduler has taken it.
_PENDING_HINT_S = 3.0
#: Without a terminal (CI logs, pipes), a plain progress line at most this often.
_PLAIN_EVERY_S = 5.0

STATUS_STYLE: dict[str, str] = {
    "PENDING": "dim",
    "READY": "cyan",
    "RUNNING": "yellow",
    "WAITING": "blue",
    "COMPLETED": "green",
    "FAILED": "red",
    "SKIPPED": "magenta",
    "CANCELLED": "bright_black",
}
#: How results taken from the cache are marked.
CACHED_STYLE = "green dim"
#: Task statuses in life-cycle order, for display.
STATUS_ORDER: tuple[str, ...] = tuple(s.value for s in TaskStatus)


def styled_status(status: str) -> Text:
    """A run or task status in its colour."""
    return Text(status, style=STATUS_STYLE.get(status, "bold"))


def counts_text(counts: dict[str, int] | Any, *, zeros: bool = False, cached: int = 0) -> Text:
    """``COMPLETED 300 (cached 120)  RUNNING 8 ...`` in life-cycle order, coloured (``cached``: how many
    of the COMPLETED tasks came from the cache)."""
    out = Text()
    for name in STATUS_ORDER:
        n = int(counts.get(name, 0))
        if n or zeros:
            if out:
                out.append("  ")
            out.append(f"{name} ", style=STATUS_STYLE[name])
            out.append(str(n), style="bold")
            if name == "COMPLETED" and cached:
                out.append(f" (cached {cached})", style=CACHED_STYLE)
    return out


def fmt_seconds(seconds: float | None) -> str:
    """``0.84s``, ``12.3s``, ``4m05s``, ``2h03m``; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def fmt_time(ts: float | None, *, compact: bool = False) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM:SS`` (``compact``: ``MM-DD HH:MM:SS``)."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts).strftime("%m-%d %H:%M:%S" if compact else "%Y-%m-%d %H:%M:%S")


def short(value: Any, width: int = 60) -> str:
    """``repr`` cut to ``width`` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


# -- live progress -----------------------------------------------------------------------------------


class _RunProgress(Progress):
    """A Progress with one bar (finished/total) and a line of counts per status under it."""

    def __init__(self, console: Console) -> None:
        self.counts = Text()
        super().__init__(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description}"),
            BarColumn(bar_width=None),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=console,
            expand=True,
        )

    def set_outcome(self, status: RunStatus) -> None:
        """Show ✓ for a COMPLETED run, ✗ otherwise, where the spinner was."""
        spinner = self.columns[0]
        if isinstance(spinner, SpinnerColumn):
            ok = status is RunStatus.COMPLETED
            spinner.finished_text = Text("✓" if ok else "✗", style="green" if ok else "red")

    def get_renderables(self) -> Iterable[RenderableType]:
        yield Group(self.make_tasks_table(self.tasks), self.counts)


def _describe(run: st.RunState, waited: float = 0.0) -> str:
    style = STATUS_STYLE.get(run.status.value, "bold")
    extra = " (cancelling)" if run.cancel_requested and not run.status.terminal else ""
    if run.status is RunStatus.PENDING and waited > _PENDING_HINT_S:
        extra = " (no scheduler has taken it yet)"
    return f"{run.run_id} [{style}]{run.status.value}[/]{extra}"


def watch(
    client: Client,
    run_id: str,
    console: Console,
    *,
    timeout: float | None = None,
    title: str | None = None,
) -> st.RunState:
    """Show a run's progress live until it ends; return its final state (``state.run_result`` projects it).

    Raises :class:`RunNotFoundError` for an unknown run and :class:`WaitTimeoutError` when the run is
    still going after ``timeout`` seconds. Without a terminal it prints a plain line now and then.
    """
    began = time.monotonic()
    states = client.follow(run_id, timeout, block_ms=_BLOCK_MS)
    run = next(states)

    plain = not console.is_terminal
    next_plain = time.monotonic() + _PLAIN_EVERY_S
    progress = _RunProgress(console)
    bar = progress.add_task(title or _describe(run), total=run.total)

    def show(r: st.RunState) -> None:
        if r.status.terminal:
            progress.set_outcome(r.status)
        waited = time.monotonic() - began
        # The total too: a run grows when a map expands.
        progress.update(
            bar, completed=r.finished_tasks, total=r.total, description=title or _describe(r, waited)
        )
        progress.counts = counts_text(r.counts, cached=r.cached)

    with progress:
        show(run)
        for run in states:
            show(run)
            if plain and time.monotonic() >= next_plain and not run.status.terminal:
                next_plain = time.monotonic() + _PLAIN_EVERY_S
                progress.console.print(
                    Text.assemble(
                        f"{run.finished_tasks}/{run.total} done  ", counts_text(run.counts, cached=run.cached)
                    )
                )
    return run


# -- static views ------------------------------------------------------------------------------------


def status_renderable(
    result: st.RunResult, *, max_failed: int = 20, outputs: dict[str, Any] | None = None
) -> RenderableType:
    """A run's summary: header, counts per status, failed tasks with their errors, outputs."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("run", f"{result.run_id}  ({result.name})")
    head.add_row("status", styled_status(result.status.value))
    if result.parent is not None:
        p = result.parent
        head.add_row("parent", f"{p.run_id} (task {p.task_id}, attempt {p.attempt}; depth {result.depth})")
    waiting = [(tid, t.child) for tid, t in result.tasks.items() if t.child and not t.status.terminal]
    if waiting:
        shown = ", ".join(f"{tid} -> {child}" for tid, child in waiting[:3])
        more = f" (+{len(waiting) - 3} more)" if len(waiting) > 3 else ""
        head.add_row("waiting for", f"child runs {shown}{more}")
    if result.reason:
        head.add_row("reason", Text(result.reason, style="red" if result.status is RunStatus.FAILED else ""))
    head.add_row("submitted", fmt_time(result.submitted_at))
    if result.started_at is not None and result.finished_at is None:
        head.add_row("running for", fmt_seconds(time.time() - result.submitted_at))
    head.add_row("duration", fmt_seconds(result.duration))
    parts: list[RenderableType] = [head]

    counts = result.counts
    n = len(result.tasks)
    table = Table(title=f"{n} task{'' if n == 1 else 's'}", title_justify="left")
    table.add_column("status")
    table.add_column("tasks", justify="right")
    for name in STATUS_ORDER:
        if counts.get(name):
            table.add_row(styled_status(name), str(counts[name]))
    cached = sum(t.cached for t in result.tasks.values())
    if cached:
        table.add_row(Text("  from the cache", style=CACHED_STYLE), str(cached))
    parts.append(table)

    failed = [(tid, t) for tid, t in result.tasks.items() if t.status is TaskStatus.FAILED]
    if failed:
        failed.sort(key=lambda item: item[1].finished_at or 0)
        ft = Table(title=f"failed tasks ({len(failed)})", title_justify="left", title_style="red")
        ft.add_column("task")
        ft.add_column("attempts", justify="right")
        ft.add_column("worker")
        ft.add_column("error", overflow="fold")
        for tid, t in failed[:max_failed]:
            ft.add_row(tid, str(t.attempts), t.worker or "-", str(t.error) if t.error else t.reason or "-")
        if len(failed) > max_failed:
            ft.add_row(f"… and {len(failed) - max_failed} more", "", "", "")
        parts.append(ft)

    if outputs:
        ot = Table(title="outputs", title_justify="left")
        ot.add_column("task")
        ot.add_column("result", overflow="fold")
        for tid, value in outputs.items():
            ot.add_row(tid, short(value, 200))
        parts.append(ot)
    return Group(*parts)


def load_run(client: Client, run_id: str) -> st.RunState:
    """Fold a run's whole log (raises :class:`RunNotFoundError` for an unknown or expired run)."""
    run: st.RunState | None = None
    for _, ev in client.log.read_run(run_id):
        run = st.apply_to_run(run, ev)
    if run is None:
        raise RunNotFoundError(f"no run {run_id!r} (never submitted, or expired after its retention time)")
    return run


def outputs(run: st.RunState, limit: int = 5) -> dict[str, Any]:
    """Results of the COMPLETED tasks nothing depends on (the workflow's outputs), if at most ``limit``."""
    sinks = [tid for tid in run.defs if not run.plan.dependents.get(tid)]
    if len(sinks) > limit:
        return {}
    return {
        tid: mapping.result_of(run, tid) for tid in sinks if run.tasks[tid].status is TaskStatus.COMPLETED
    }


def result_dict(result: st.RunResult, *, tasks: bool = True) -> dict[str, Any]:
    """A run's summary as plain JSON data (``nerv status --json``)."""
    out: dict[str, Any] = {
        "run_id": result.run_id,
        "name": result.name,
        "status": result.status.value,
        "reason": result.reason,
        "submitted_at": result.submitted_at,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "duration": result.duration,
        "parent": result.parent.to_dict() if result.parent is not None else None,
        "depth": result.depth,
        "total": len(result.tasks),
        "counts": {name: result.counts[name] for name in STATUS_ORDER if name in result.counts},
        "cached": sum(t.cached for t in result.tasks.values()),
        "failed": {
            tid: (t.error.to_dict() if t.error else {"type": "", "message": t.reason})
            for tid, t in result.tasks.items()
            if t.status is TaskStatus.FAILED
        },
    }
    if tasks:
        out["tasks"] = {
            tid: {
                "status": t.status.value,
                "attempts": t.attempts,
                "worker": t.worker,
                "dispatched_at": t.dispatched_at,
                "started_at": t.started_at,
                "finished_at": t.finished_at,
                "result": t.result,
                "error": t.error.to_dict() if t.error else None,
                "reason": t.reason,
                "cached": t.cached,
                "cached_from": t.cached_from,
                "child": t.child,
            }
            for tid, t in result.tasks.items()
        }
    return out


def plan_renderable(
    wf: Workflow, the_plan: Plan, *, max_levels: int = 40, max_ids: int = 8
) -> RenderableType:
    """Levels, width and critical path of a workflow's plan."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column(overflow="fold")
    queues: dict[str, int] = {}
    for t in wf.tasks:
        queues[t.queue] = queues.get(t.queue, 0) + 1
    head.add_row("workflow", wf.name)
    head.add_row("tasks", f"{len(wf)}  ({', '.join(f'{q} {n}' for q, n in sorted(queues.items()))})")
    head.add_row("levels", str(len(the_plan.levels)))
    head.add_row("width", f"{the_plan.width}  (the most tasks that can run at once)")
    cp = the_plan.critical_path
    shown = " → ".join(cp) if len(cp) <= 12 else " → ".join([*cp[:5], "…", *cp[-5:]])
    head.add_row("critical path", f"{len(cp)} tasks: {shown}")

    table = Table(title="levels (in dispatch order)", title_justify="left")
    table.add_column("level", justify="right")
    table.add_column("tasks", justify="right")
    table.add_column("ids", overflow="fold")
    for i, level in enumerate(the_plan.levels[:max_levels]):
        ids = ", ".join(level[:max_ids]) + (f", … (+{len(level) - max_ids})" if len(level) > max_ids else "")
        table.add_row(str(i), str(len(level)), ids)
    if len(the_plan.levels) > max_levels:
        table.add_row("…", "", f"{len(the_plan.levels) - max_levels} more levels")
    return Group(head, table)


def nest_runs(
    rows: list[tuple[str, float, st.RunResult | None]],
) -> list[tuple[int, tuple[str, float, st.RunResult | None]]]:
    """``rows`` (newest first) with each child run right under its parent, as (indent level, row):
    a child whose parent is among the rows goes under it (its children under it in turn, newest
    first); the others keep their place at level 0."""
    ids = {rid for rid, _, _ in rows}
    kids: dict[str, list[tuple[str, float, st.RunResult | None]]] = {}
    top = []
    for row in rows:
        result = row[2]
        parent = result.parent.run_id if result is not None and result.parent is not None else None
        if parent is not None and parent in ids and parent != row[0]:
            kids.setdefault(parent, []).append(row)
        else:
            top.append(row)
    out: list[tuple[int, tuple[str, float, st.RunResult | None]]] = []
    seen: set[str] = set()

    def walk(row: tuple[str, float, st.RunResult | None], level: int) -> None:
        if row[0] in seen:  # a malformed lineage loop: show each run once
            return
        seen.add(row[0])
        out.append((level, row))
        for kid in kids.get(row[0], ()):
            walk(kid, level + 1)

    for row in top:
        walk(row, 0)
    for row in rows:  # rows only reachable through a loop
        if row[0] not in seen:
            walk(row, 0)
    return out


def runs_renderable(rows: list[tuple[str, float, st.RunResult | None]]) -> RenderableType:
    """Recent runs: id, status, done/total, submit time, duration; child runs indented under their
    parents (see :func:`nest_runs`), a child whose parent is not listed marked with its parent."""
    table = Table(title=f"{len(rows)} most recent runs", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("run", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("done", justify="right", no_wrap=True)
    table.add_column("submitted", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    for level, (run_id, submitted, result) in nest_runs(rows):
        when = fmt_time(submitted, compact=True)
        label = "  " * (level - 1) + "└ " + run_id if level else run_id
        if result is not None and result.parent is not None and not level:
            label = f"{run_id} [dim](child of {result.parent.run_id})[/]"
        if result is None:
            table.add_row(label, Text("EXPIRED", style="dim"), "-", when, "-")
            continue
        done = sum(result.counts.get(s, 0) for s in ("COMPLETED", "FAILED", "SKIPPED", "CANCELLED"))
        table.add_row(
            label,
            styled_status(result.status.value),
            f"{done}/{len(result.tasks)}",
            when,
            fmt_seconds(result.duration),
        )
    return table


__all__ = [
    "counts_text",
    "fmt_seconds",
    "load_run",
    "nest_runs",
    "outputs",
    "plan_renderable",
    "result_dict",
    "runs_renderable",
    "status_renderable",
    "watch",
]
