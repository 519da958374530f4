"""The planner (the seed's QuantumPartitioner): dependency levels, priority order, critical path.

Pure functions over task definitions; the client uses them to validate, the scheduler to order dispatch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nerv_cluster.errors import CycleError, DuplicateTaskError, UnknownDependencyError
from nerv_cluster.model import TaskDef


@dataclass(frozen=True, slots=True)
class Plan:
    """What the planner knows about a workflow.

    ``levels[k]`` holds the tasks whose longest chain of dependencies has ``k`` links, each level in
    dispatch order. ``order`` is every task in dispatch order (levels first, then priority, then the
    longest path still ahead, then the order of definition). ``rank`` maps a task to its position in
    ``order``, the sort key the scheduler uses for ready tasks. ``dependents`` is the reverse graph.
    """

    levels: tuple[tuple[str, ...], ...]
    order: tuple[str, ...]
    rank: Mapping[str, int]
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


def plan(tasks: Sequence[TaskDef]) -> Plan:
    """Plan a workflow: levels by Kahn's algorithm, then the order within each level.

    Raises :class:`CycleError` naming the tasks of a cycle, and the errors of :func:`check_graph`.
    """
    check_graph(tasks)
    ids = [t.id for t in tasks]
    position = {tid: i for i, tid in enumerate(ids)}
    # Dependencies are already unique (Workflow.add and TaskDef.from_dict dedupe them).
    deps = {t.id: t.dependencies for t in tasks}
    dependents: dict[str, list[str]] = {tid: [] for tid in ids}
    for tid, ds in deps.items():
        for d in ds:
            dependents[d].append(tid)

    remaining = {tid: len(ds) for tid, ds in deps.items()}
    level_of = dict.fromkeys(ids, 0)
    topo: list[str] = [tid for tid in ids if not remaining[tid]]
    i = 0
    while i < len(topo):
        tid = topo[i]
        i += 1
        below = level_of[tid] + 1
        for child in dependents[tid]:
            if level_of[child] < below:
                level_of[child] = below
            left = remaining[child] - 1
            remaining[child] = left
            if not left:
                topo.append(child)
    if len(topo) != len(ids):
        stuck = {tid for tid in ids if remaining[tid] > 0}
        raise CycleError(_find_cycle(stuck, deps))

    # Longest chain from each task to a sink, counted in tasks: what is still ahead of it.
    ahead: dict[str, int] = {}
    for tid in reversed(topo):
        most = 0
        for c in dependents[tid]:
            if ahead[c] > most:
                most = ahead[c]
        ahead[tid] = most + 1

    keyed = sorted(
        (level_of[t.id], -int(t.priority), -ahead[t.id], position[t.id], t.id) for t in tasks
    )
    order = tuple(k[-1] for k in keyed)
    depth = max(level_of.values(), default=-1) + 1
    levels: list[list[str]] = [[] for _ in range(depth)]
    for tid in order:
        levels[level_of[tid]].append(tid)

    # Critical path: start at the task with the most ahead of it, follow the child with the most ahead.
    critical: list[str] = []
    if ids:
        node: str | None = max(ids, key=lambda t: (ahead[t], -position[t]))
        while node is not None:
            critical.append(node)
            node = max(dependents[node], key=lambda t: (ahead[t], -position[t]), default=None)

    return Plan(
        levels=tuple(tuple(level) for level in levels),
        order=order,
        rank={tid: r for r, tid in enumerate(order)},
        level_of=level_of,
        dependents={tid: tuple(cs) for tid, cs in dependents.items()},
        critical_path=tuple(critical),
    )
