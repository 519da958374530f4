"""Map: one task per element of a list known only at run time (``Workflow.map``).

A map node is a task of the static definition whose ``TaskDef.over`` says what it maps over: a task
(its result, a JSON list), another map (element-wise), or a literal list. It never runs itself. Once it
is READY and its other dependencies have ended, the scheduler computes the list, checks it, and writes
MAP_EXPANDED (``{"width": n}``), or fails the map with a :class:`~nerv_cluster.errors.MapError`. The
fold of MAP_EXPANDED adds the elements ``<map id>[<i>]`` to the run: their definitions (the element
first, then the map's ``args``, then its ``kwargs``; every option the map's), their states and their
dependents. The map node is then RUNNING while its elements run; no worker holds it, so it is not in the
run's ``running`` set (nothing to watch for a lost worker or a timeout). Its ``ok``/``failed``/
``skipped`` counters count how its elements ended; once all have, it is in the run's ``gathered`` set
and the scheduler writes its end (:func:`end_event`). Its result is the list of its elements' results,
computed from them when read (:func:`result_of`), never stored twice.

A map over a map is element-wise: when map A expands, a map B over A (that does not also take A's whole
result as an argument) is settled as if A had ended the way that lets some element of B run (completed;
failed for ``one_failed``), so it expands with A's width at once, B[i] depending on A[i] and taking B's
trigger rule against it (:func:`follows`). A's own end then no longer concerns B (``Growth.trimmed``),
and a RUNNING map node counts only its own elements' ends.

A rerun (``nerv_cluster.rerun``, through its ``MapHook``) keeps a map's list as it expanded: elements
are reset and run again, their map node waits for them again, and nothing expands twice (see the
functions at the end of this module).

Invariant: the grown graph is a pure function of the run's log. Element ids derive from the map id and
the index; element definitions from the map's definition and its list (the literal, the upstream result
in the folded state, or the followed map's element ids). So a refold, a checkpoint and a crash all give
the very same graph, and nothing is ever made twice. Growing costs O(width) per expansion; a lookup in
the grown graph is O(1) (the static dict, else the element's layer found from its id): no per-event
work grows with the size of the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from pyrsistent import PMap, pmap

from nerv_cluster import constants
from nerv_cluster.errors import MapError
from nerv_cluster.model import Event, EventType, TaskDef, TaskError, TaskStatus, TriggerRule
from nerv_cluster.planner import Plan

if TYPE_CHECKING:
    from nerv_cluster.state import RunState, TaskState

_REF = constants.REF_KEY


class Growth(NamedTuple):
    """What a run's graph gained at run time: one layer of elements per expanded map node."""

    #: Map id -> its elements' definitions, element ``i`` at index ``i``.
    layers: PMap[str, tuple[TaskDef, ...]] = pmap()
    #: Map ids in the order they expanded (how the grown graph is iterated).
    order: tuple[str, ...] = ()
    #: Map A -> the maps expanded element-wise over A: element ``A[i]``'s dependents include ``B[i]``.
    feeds: PMap[str, tuple[str, ...]] = pmap()
    #: Map A -> its static dependents without the maps that follow it element-wise (settled when A
    #: expanded, so A's end must not settle them again).
    trimmed: PMap[str, tuple[str, ...]] = pmap()
    #: Number of elements in all layers.
    size: int = 0


NO_GROWTH = Growth()


def element_id(map_id: str, index: int) -> str:
    """The id of element ``index`` of map ``map_id``: outside the user id alphabet (``[``, ``]``), so it
    can never clash with a task of the definition."""
    return f"{map_id}[{index}]"


def is_element(task_id: str) -> bool:
    """True for an element id (user ids cannot end with ``]``)."""
    return task_id[-1:] == "]"


class _Spot(NamedTuple):
    """Where an element lives: its map, its index, and that map's layer."""

    map_id: str
    at: int
    layer: tuple[TaskDef, ...]


def _locate(layers: PMap[str, tuple[TaskDef, ...]], tid: str) -> _Spot | None:
    """Where element ``tid`` lives in ``layers``, or None when it names no element."""
    if tid[-1:] != "]":
        return None
    at = tid.rfind("[")
    map_id = tid[:at]
    layer = layers.get(map_id) if at > 0 else None
    if layer is None:
        return None
    digits = tid[at + 1 : -1]
    if not (digits.isascii() and digits.isdigit()):
        return None
    i = int(digits)
    if i >= len(layer) or layer[i].id != tid:  # "A[01]" is no element, though int() reads 1
        return None
    return _Spot(map_id, i, layer)


class _Grown(Mapping[str, Any]):
    """A static dict of the definition's tasks, plus the elements of every expanded map."""

    __slots__ = ("growth", "static")

    def __init__(self, static: Mapping[str, Any], growth: Growth) -> None:
        self.static = static
        self.growth = growth

    def _element(self, spot: _Spot) -> Any:
        raise NotImplementedError

    def __getitem__(self, tid: str) -> Any:
        value = self.static.get(tid)
        if value is not None:
            return value
        spot = _locate(self.growth.layers, tid)
        if spot is None:
            raise KeyError(tid)
        return self._element(spot)

    def __contains__(self, tid: object) -> bool:
        if tid in self.static:
            return True
        return isinstance(tid, str) and _locate(self.growth.layers, tid) is not None

    def __iter__(self) -> Iterator[str]:
        yield from self.static
        layers = self.growth.layers
        for map_id in self.growth.order:
            for td in layers[map_id]:
                yield td.id

    def __len__(self) -> int:
        return len(self.static) + self.growth.size

    def __eq__(self, other: object) -> bool:
        if type(other) is type(self):
            return self.growth == other.growth and self.static == other.static
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self.static)} static + {self.growth.size} elements>"


class GrownDefs(_Grown):
    """A run's task definitions once a map expanded: ``run.defs``."""

    def _element(self, spot: _Spot) -> TaskDef:
        return spot.layer[spot.at]


class GrownDependents(_Grown):
    """A run's dependents once a map expanded: ``run.plan.dependents``. An element's dependents are
    its map node (which counts its elements) and the same element of each map following it."""

    def __getitem__(self, tid: str) -> tuple[str, ...]:
        deps = self.static.get(tid)
        if deps is not None:
            trimmed = self.growth.trimmed
            return trimmed.get(tid, deps) if trimmed else deps
        return super().__getitem__(tid)

    def _element(self, spot: _Spot) -> tuple[str, ...]:
        map_id = spot.map_id
        followers = self.growth.feeds.get(map_id) if self.growth.feeds else None
        if not followers:
            return (map_id,)
        return (map_id, *(element_id(b, spot.at) for b in followers))


class GrownRank(_Grown):
    """A run's dispatch ranks once a map expanded: ``run.plan.rank``. Elements rank just after their map
    node, in index order."""

    def _element(self, spot: _Spot) -> float:
        return float(self.static[spot.map_id]) + (spot.at + 1) / (len(spot.layer) + 1)


def _static(view: Mapping[str, Any]) -> Mapping[str, Any]:
    return view.static if isinstance(view, _Grown) else view


# -- what a map maps over ---------------------------------------------------------------------------


def source(td: TaskDef) -> str | None:
    """The task id ``td`` maps over when ``over`` is a reference, else None (a literal list, or no map)."""
    over = td.over
    if type(over) is dict and len(over) == 1:
        ref = over.get(_REF)
        return ref if isinstance(ref, str) else None
    return None


def refers(value: Any, task_id: str) -> bool:
    """True when JSON ``value`` holds a reference marker to ``task_id``."""
    if isinstance(value, list | tuple):
        return any(refers(v, task_id) for v in value)
    if isinstance(value, Mapping):
        if len(value) == 1 and value.get(_REF) == task_id:
            return True
        return any(refers(v, task_id) for v in value.values())
    return False


def follows(defs: Mapping[str, TaskDef], td: TaskDef) -> str | None:
    """The map ``td`` follows element-wise (it maps over that map and does not take its whole result
    as an argument too), else None."""
    src = source(td)
    if src is None:
        return None
    up = defs.get(src)
    if up is None or up.over is None or refers(td.args, src) or refers(td.kwargs, src):
        return None
    return src


class Source(NamedTuple):
    """What a map node expands into, once known."""

    width: int
    #: The values to map over (None when following a map element-wise: element ``i`` takes ``A[i]``).
    values: Sequence[Any] | None
    #: The map followed element-wise, if any.
    feed: str | None
    #: The map's dependencies its elements keep (every one but the source, unless an argument refers to
    #: it): all ended when the map expands.
    others: tuple[str, ...]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def source_of(run: RunState, tid: str) -> Source | str | None:
    """What map node ``tid`` expands into now: a :class:`Source`, a reason it cannot (it fails), or None
    while it must wait (a dependency other than the map it follows has not ended yet)."""
    td = run.defs[tid]
    tasks = run.tasks
    feed = follows(run.defs, td)
    src = feed or source(td)
    keep = src is not None and feed is None and (refers(td.args, src) or refers(td.kwargs, src))
    others = tuple(d for d in td.dependencies if d != src or keep)
    for d in others:
        if not tasks[d].status.terminal:
            return None
    if feed is not None:
        layer = run.growth.layers.get(feed)
        if layer is not None:
            return Source(len(layer), None, feed, others)
        # Settled by the followed map's end (a trigger rule that runs on failure): it never expanded.
        up = tasks[feed].status
        return f"map {tid!r} has no list to map over: map {feed!r} is {up.value}" if up.terminal else None
    if src is None:
        over = td.over
        if not isinstance(over, list):
            return f"map {tid!r} maps over {_type_name(over)}, not a list"
        return Source(len(over), over, None, others)
    up = tasks[src].status
    if up is not TaskStatus.COMPLETED:
        return f"map {tid!r} has no list to map over: task {src!r} is {up.value}"
    value = result_of(run, src)
    if not isinstance(value, list):
        return f"map {tid!r} maps over the result of {src!r}, which is {_type_name(value)}, not a list"
    return Source(len(value), value, None, others)


#: The TaskDef fields an element copies from its map as they are (every field but those it sets).
_COPIED = tuple(
    f.name
    for f in dataclasses.fields(TaskDef)
    if f.name not in ("id", "name", "dependencies", "args", "over")
)


def _elements(td: TaskDef, src: Source) -> tuple[TaskDef, ...]:
    """The element definitions of map ``td`` for ``src``: the map's definition (every option, whatever
    fields TaskDef gains) with the element's id, name, dependencies and first argument.

    Built field by field rather than by ``dataclasses.replace`` (2-3x its speed: this runs once per
    element), which is what ``replace`` would build: the frozen dataclass's own fields, set once.
    """
    copied = [(name, getattr(td, name)) for name in _COPIED]
    new, put = object.__new__, object.__setattr__
    map_id, name, others, rest, feed = td.id, td.name, src.others, td.args, src.feed
    values = src.values if src.values is not None else ()
    out = []
    for i in range(src.width):
        e = new(TaskDef)
        for field_name, value in copied:
            put(e, field_name, value)
        put(e, "id", f"{map_id}[{i}]")
        put(e, "name", f"{name}[{i}]")
        put(e, "over", None)
        if feed is not None:
            up = f"{feed}[{i}]"
            put(e, "dependencies", (up, *others))
            put(e, "args", ({_REF: up}, *rest))
        else:
            put(e, "dependencies", others)
            put(e, "args", (values[i], *rest))
        out.append(e)
    return tuple(out)


class Grown(NamedTuple):
    """A run's graph after one map expanded (see :func:`grow`)."""

    defs: GrownDefs
    plan: Plan
    growth: Growth
    #: The new elements' definitions.
    elements: tuple[TaskDef, ...]
    #: Maps that follow the expanded one element-wise: the fold settles them as if it had completed.
    followers: tuple[str, ...]


def grow(defs: Mapping[str, TaskDef], the_plan: Plan, growth: Growth, td: TaskDef, src: Source) -> Grown:
    """The graph with map ``td``'s elements for ``src`` added. Pure; O(width)."""
    static_defs = _static(defs)
    static_deps = _static(the_plan.dependents)
    elements = _elements(td, src)
    feeds, trimmed = growth.feeds, growth.trimmed
    if src.feed is not None:
        feeds = feeds.set(src.feed, (*feeds.get(src.feed, ()), td.id))
    mine = static_deps[td.id]
    followers = tuple(b for b in mine if follows(static_defs, static_defs[b]) == td.id)
    if followers:
        trimmed = trimmed.set(td.id, tuple(b for b in mine if b not in followers))
    new = Growth(
        layers=growth.layers.set(td.id, elements),
        order=(*growth.order, td.id),
        feeds=feeds,
        trimmed=trimmed,
        size=growth.size + len(elements),
    )
    plan = dataclasses.replace(
        the_plan,
        dependents=GrownDependents(static_deps, new),
        rank=GrownRank(_static(the_plan.rank), new),
    )
    return Grown(GrownDefs(static_defs, new), plan, new, elements, followers)


def result_of(run: RunState, tid: str) -> Any:
    """A task's result; for an expanded map node, the list of its elements' results in order."""
    layers = run.growth.layers
    layer = layers.get(tid) if layers else None
    if layer is None:
        return run.tasks[tid].result
    tasks = run.tasks
    return [tasks[e.id].result for e in layer]


# -- decisions (pure; called by scheduler.decisions.decide) -------------------------------------------


def _fail(run: RunState, tid: str, message: str, reason: str, now: float, source: str) -> Event:
    error = TaskError.from_exception(MapError(message))
    attempt = run.tasks[tid].attempt
    data = {"error": error.to_dict(), "reason": reason}
    return Event(EventType.TASK_FAILED, run.run_id, tid, attempt, data, ts=now, source=source)


def expansion(
    run: RunState, tid: str, max_width: int, max_tasks: int, now: float, source: str
) -> Event | None:
    """For READY map node ``tid``: MAP_EXPANDED with its width, TASK_FAILED with a :class:`MapError`
    when it cannot expand (not a list, too wide, or the run would pass ``max_tasks``), or None while it
    waits for a dependency. A map's failure is final: its list would be the same on a retry."""
    src = source_of(run, tid)
    if src is None:
        return None
    if isinstance(src, str):
        return _fail(run, tid, src, "map not expanded", now, source)
    if src.width > max_width:
        message = f"map {tid!r} has {src.width} elements; the limit is {max_width} (NERV_MAX_MAP_WIDTH)"
        return _fail(run, tid, message, "map too wide", now, source)
    if run.total + src.width > max_tasks:
        message = (
            f"map {tid!r} has {src.width} elements, which would make the run {run.total + src.width} "
            f"tasks; the limit is {max_tasks} (NERV_MAX_TASKS)"
        )
        return _fail(run, tid, message, "map too wide", now, source)
    attempt = run.tasks[tid].attempt
    return Event(
        EventType.MAP_EXPANDED, run.run_id, tid, attempt, {"width": src.width}, ts=now, source=source
    )


def end_event(run: RunState, tid: str, now: float, source: str) -> Event:
    """The end of gathered map node ``tid`` (every element ended): TASK_COMPLETED when all completed
    (no result: it is computed from the elements), else TASK_FAILED naming the first element that did
    not complete (by index) and how many did not."""
    ts = run.tasks[tid]
    layer = run.growth.layers[tid]
    width = len(layer)
    if ts.ok == width:
        data = {"elements": width}
        return Event(EventType.TASK_COMPLETED, run.run_id, tid, ts.attempt, data, ts=now, source=source)
    tasks = run.tasks
    bad = [e.id for e in layer if tasks[e.id].status is not TaskStatus.COMPLETED]
    first = tasks[bad[0]]
    why = str(first.error) if first.error is not None else (first.reason or first.status.value)
    more = f" ({len(bad)} of {width} elements did not complete)" if len(bad) > 1 else ""
    message = f"map {tid!r}: element {bad[0]!r} is {first.status.value}: {why}{more}"
    return _fail(run, tid, message, f"element {bad[0]} {first.status.value.lower()}", now, source)


# -- rerun (the map's hook: ``nerv_cluster.rerun.MapHook``) ----------------------------------------------
#
# A map's list is fixed once it expanded: its elements stay what they were made from. A rerun reruns
# elements (the failed ones, or all of a map named), and their map node goes back to RUNNING, waiting
# for them; a map that never expanded is reset like any task and expands when it is ready again.


def rerun_named(run: RunState, tid: str) -> tuple[str, ...]:
    """The tasks a rerun naming ``tid`` adds: every element of an expanded map node."""
    layer = run.growth.layers.get(tid) if run.growth.layers else None
    return () if layer is None else tuple(e.id for e in layer)


def rerun_downstream(run: RunState, tid: str) -> tuple[str, ...]:
    """What builds on ``tid`` beyond the run's dependents: the maps following an expanded map node
    element-wise (their edge to it lives in its elements since it expanded)."""
    feeds = run.growth.feeds
    return feeds.get(tid, ()) if feeds else ()


def rerun_state(run: RunState, tid: str, old: TaskState, new: TaskState) -> TaskState:
    """An expanded map node's state after a rerun reset it: RUNNING again (not expanded again), with a
    new attempt, so no end of its old one counts; its counters are set by :func:`rerun_after`."""
    if not run.growth.layers or tid not in run.growth.layers:
        return new
    attempt = old.attempt + 1
    return new._replace(status=TaskStatus.RUNNING, attempt=attempt, first=attempt, started_at=old.started_at)


def rerun_after(run: RunState, selected: Sequence[str]) -> RunState:
    """``run`` after a rerun reset ``selected``: each reset map node counts how its elements that were
    not reset ended (O(its width)), is gathered at once when all of them did, and stays out of the
    ``running`` set (no worker holds it). Uses the run's maps linearly (they may be drafts)."""
    layers = run.growth.layers
    if not layers:
        return run
    reset = set(selected)
    run = _refollow(run, [tid for tid in selected if tid not in layers], reset)
    nodes = [tid for tid in selected if tid in layers]
    tasks, gathered, running = run.tasks, run.gathered, run.running
    for tid in nodes:
        ok = failed = skipped = 0
        for e in layers[tid]:
            if e.id in reset:
                continue
            status = tasks[e.id].status
            if status is TaskStatus.COMPLETED:
                ok += 1
            elif status is TaskStatus.FAILED:
                failed += 1
            elif status.terminal:
                skipped += 1
        tasks = tasks.set(tid, tasks[tid]._replace(ok=ok, failed=failed, skipped=skipped))
        if ok + failed + skipped == len(layers[tid]):
            gathered = gathered.set(tid, True)
        if tid in running:
            running = running.discard(tid)
    return run._replace(tasks=tasks, gathered=gathered, running=running)


def _refollow(run: RunState, selected: Sequence[str], reset: set[str]) -> RunState:
    """``run`` with each reset map among ``selected`` that follows an expanded map element-wise counted
    again: the followed map's expansion met that dependency (as when it expanded, see the fold), not
    its end, whether or not the rerun reset it too; ready, doomed and the tally follow."""
    from nerv_cluster.state import outcome_counts, rule_outcome  # state imports this module

    layers, defs = run.growth.layers, run.defs
    tasks, ready, doomed, tally = run.tasks, run.ready, run.doomed, list(run.tally)
    statuses = list(TaskStatus)
    changed = False
    for tid in selected:
        td = defs[tid]
        feed = follows(defs, td) if td.over is not None else None
        cs = tasks[tid]
        if feed is None or feed not in layers or cs.status not in (TaskStatus.PENDING, TaskStatus.READY):
            continue
        ok, failed, skipped = outcome_counts(
            run, (d for d in td.dependencies if d != feed and d not in reset)
        )
        if feed in td.dependencies:  # met by the followed map's expansion, as in the fold
            if td.trigger is TriggerRule.ONE_FAILED:
                failed += 1
            else:
                ok += 1
        verdict = rule_outcome(td.trigger, len(td.dependencies), ok, failed, skipped)
        status = TaskStatus.READY if verdict is True else TaskStatus.PENDING
        if status is not cs.status:
            tally[statuses.index(cs.status)] -= 1
            tally[statuses.index(status)] += 1
        ready = ready.set(tid, True) if status is TaskStatus.READY else ready.discard(tid)
        doomed = doomed.set(tid, True) if verdict is False else doomed.discard(tid)
        tasks = tasks.set(tid, cs._replace(status=status, ok=ok, failed=failed, skipped=skipped))
        changed = True
    if not changed:
        return run
    return run._replace(tasks=tasks, ready=ready, doomed=doomed, tally=tuple(tally))
