"""The planner (the seed's QuantumPartitioner): dependency levels, priority order, critical path.

Pure functions over task definitions; the client uses them to validate, the scheduler to order dispatch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nerv_cluster import gcpause
from nerv_cluster.errors import CycleError, DuplicateTaskError, UnknownDependencyError
from nerv_cluster.model import TaskDef


@dataclass(frozen=True, slots=True)
class Plan:
    """What the planner knows about a workflow.

    ``levels[k]`` holds the tasks whose longest chain of dependencies has ``k`` links, each level in
    dispatch order. ``order`` is every task in dispatch order (levels first, then priority, then the
    longest path still ahead, then the order of definition). ``rank`` maps a task to its position in
    ``order``, the sort key the scheduler uses for ready tasks. ``dependents`` is the reverse graph.
    (Once a map expands, the run's plan looks its elements up too: see :mod:`nerv_cluster.mapping`.)
    """

    levels: tuple[tuple[str, ...], ...]
    order: tuple[str, ...]
    rank: Mapping[str, float]
    level_of: Mapping[str, int]
    dependents: Mapping[str, tuple[str, ...]]
    critical_path: tuple[str, ...]

    @property
    def critical_path_length(self) -> int:
        """Number of tasks on the longest dependency chain."""
        return len(self.critical_path)

    @property
    def width(self) -> int:
        """Size of the widest level: the most tasks that can ever run at once."""
        return max((len(level) for level in self.levels), default=0)


def check_graph(tasks: Sequence[TaskDef]) -> None:
    """Raise on duplicate ids and unknown dependencies (cycles are found by :func:`plan`)."""
    seen: set[str] = set()
    for t in tasks:
        if t.id in seen:
            raise DuplicateTaskError(f"duplicate task id {t.id!r}")
        seen.add(t.id)
    for t in tasks:
        for dep in t.dependencies:
            if dep not in seen:
                raise UnknownDependencyError(f"task {t.id!r} depends on unknown task {dep!r}")
            if dep == t.id:
                raise CycleError([t.id])


def _find_cycle(nodes: set[str], deps: Mapping[str, Sequence[str]]) -> list[str]:
    """A cycle among ``nodes`` (all of which are on or behind one), in dependency order."""
    # Walk dependency edges from any stuck node; within the stuck set every node has a stuck dependency,
    # so the walk must revisit a node, and the part from that node on is a cycle.
    start = min(nodes)
    path: list[str] = []
    index: dict[str, int] = {}
    node = start
    while node not in index:
        index[node] = len(path)
        path.append(node)
        node = next(d for d in deps[node] if d in nodes)
    cycle = path[index[node] :]
    cycle.reverse()  # report in execution direction: a -> b means b depends on a
    return cycle


def _positions(tasks: Sequence[TaskDef]) -> tuple[list[str], dict[str, int]]:
    """The ids in order and each one's position; the errors of :func:`check_graph` for a duplicate."""
    ids = [t.id for t in tasks]
    position = dict(zip(ids, range(len(ids)), strict=True))
    if len(position) != len(ids):
        check_graph(tasks)  # raises the error for the first problem, as when it ran up front
        raise AssertionError("check_graph accepted duplicate ids")
    return ids, position


@gcpause.pausing  # a dict entry per task
def check_acyclic(tasks: Sequence[TaskDef]) -> None:
    """Raise what :func:`plan` raises for these tasks (duplicate ids, unknown dependencies, a cycle),
    without planning them: for a validation that does not need the plan.

    Tasks that each come after all their dependencies (as tasks are usually added) cannot form a
    cycle, which one pass over the dependencies shows; otherwise :func:`plan` decides.
    """
    _, position = _positions(tasks)
    try:
        for i, t in enumerate(tasks):
            for d in t.dependencies:
                if position[d] >= i:
                    plan(tasks)  # an edge forward (or to itself): only Kahn's walk can tell
                    return
    except KeyError:  # an unknown dependency
        check_graph(tasks)
        raise AssertionError("check_graph accepted an unknown dependency") from None


def _structure(tasks: Sequence[TaskDef]) -> tuple[list[str], list[list[int]], Sequence[int], list[int]]:
    """The graph by position: ids, children, a topological order and each task's level (the longest
    chain of dependencies below it); the errors of :func:`check_graph` and a :class:`CycleError`."""
    # Tasks are worked on by position (list indexing, int keys) and turned back into ids only for the
    # result: this runs for every submit and every refold, on up to hundreds of thousands of tasks.
    ids, position = _positions(tasks)
    n = len(ids)
    children: list[list[int]] = [[] for _ in range(n)]
    level = [0] * n
    # In one pass: the children, and each task's level while every dependency comes before its task
    # (then the definition order is a topological one and Kahn's walk is not needed).
    in_order = True
    try:
        for i, t in enumerate(tasks):
            below = 0
            for d in t.dependencies:
                p = position[d]
                children[p].append(i)
                if p >= i:
                    in_order = False
                elif level[p] >= below:
                    below = level[p] + 1
            level[i] = below
    except KeyError:  # an unknown dependency
        check_graph(tasks)  # raises the error for the first problem, as when it ran up front
        raise AssertionError("check_graph accepted an unknown dependency") from None
    if in_order:
        return ids, children, range(n), level

    # Dependencies are already unique (Workflow.add and TaskDef.from_dict dedupe them).
    remaining = [len(t.dependencies) for t in tasks]
    level = [0] * n
    topo = [i for i in range(n) if not remaining[i]]
    for i in topo:  # topo grows while we walk it (Kahn's queue)
        below = level[i] + 1
        for c in children[i]:
            if level[c] < below:
                level[c] = below
            left = remaining[c] - 1
            remaining[c] = left
            if not left:
                topo.append(c)
    if len(topo) != n:
        check_graph(tasks)  # a task depending on itself is reported as such, as when it ran up front
        stuck = {ids[i] for i in range(n) if remaining[i] > 0}
        raise CycleError(_find_cycle(stuck, {t.id: t.dependencies for t in tasks}))
    return ids, children, topo, level


@gcpause.pausing  # lists, dicts and tuples per task, none of them in a cycle
def plan(tasks: Sequence[TaskDef]) -> Plan:
    """Plan a workflow: levels (in one pass when every task comes after its dependencies, else by
    Kahn's algorithm), then the order within each level.

    Raises :class:`CycleError` naming the tasks of a cycle, and the errors of :func:`check_graph`.
    """
    ids, children, topo, level = _structure(tasks)
    n = len(ids)

    # Longest chain from each task to a sink, counted in tasks: what is still ahead of it.
    ahead = [0] * n
    for i in reversed(topo):
        most = 0
        for c in children[i]:
            if ahead[c] > most:
                most = ahead[c]
        ahead[i] = most + 1

    # Dispatch order: by (level, -priority, -ahead, position). Position is unique, so one int per task
    # in mixed radix (each digit within its range) sorts exactly as those tuples, several times faster.
    prios = [int(t.priority) for t in tasks]
    top_prio, top_ahead = max(prios, default=0), max(ahead, default=0)
    prio_span = top_prio - min(prios, default=0) + 1
    keys = sorted(
        ((lv * prio_span + top_prio - pr) * top_ahead + top_ahead - ah) * n + i
        for i, (lv, pr, ah) in enumerate(zip(level, prios, ahead, strict=True))
    )
    ordered = [k % n for k in keys]
    order = tuple(map(ids.__getitem__, ordered))
    # Levels are runs of ``order``, which is sorted by level first.
    per_level = [0] * (max(level, default=-1) + 1)
    for lv in level:
        per_level[lv] += 1
    levels = []
    start = 0
    for size in per_level:
        levels.append(order[start : start + size])
        start += size

    # Critical path: start at the task with the most ahead of it, follow the child with the most ahead
    # (ties: the first defined).
    critical: list[str] = []
    if ids:
        node: int | None = ahead.index(top_ahead)
        while node is not None:
            critical.append(ids[node])
            node = max(children[node], key=lambda c: (ahead[c], -c), default=None)

    return Plan(
        levels=tuple(levels),
        order=order,
        rank=dict(zip(order, range(n), strict=True)),
        level_of=dict(zip(ids, level, strict=True)),
        dependents=dict(zip(ids, [tuple(map(ids.__getitem__, cs)) for cs in children], strict=True)),
        critical_path=tuple(critical),
    )
