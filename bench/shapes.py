"""The workload shapes every engine runs: plain DAG descriptions, so all engines build the same graph.

A ``Shape`` has nodes ``0 .. n-1`` listed in a topological order (every parent index is smaller than its
child's) and, for each node, the tuple of its parents. Every node is a noop task. ``node_id(i)`` gives the
string id an engine should use when it needs names.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

#: Default sizes at ``--n-scale 1.0``.
FANOUT_N = 2000
CHAIN_N = 200
FANIN_N = 1000
LATTICE_WIDTH = 50
LATTICE_DEPTH = 20
RANDOM_N = 5000
RANDOM_MAX_PARENTS = 4
#: Parents of a random node are drawn from this many nodes just before it, so the DAG has real depth.
RANDOM_WINDOW = 100
DEFAULT_SEED = 42


def node_id(index: int) -> str:
    """The string id of node ``index`` (engines that need names use it, so logs line up)."""
    return f"n{index}"


@dataclass(frozen=True)
class Shape:
    """One workload: ``parents[i]`` are the nodes node ``i`` depends on; all parents come before ``i``."""

    name: str
    description: str
    parents: tuple[tuple[int, ...], ...]
    params: dict[str, int] = field(default_factory=dict)
    #: Why peers are n/a for this shape when it measures a feature of ours alone (its row then compares
    #: our engine with itself, e.g. a cached run against an uncached one); empty for a shared shape.
    ours_only: str = ""
    #: A shape whose work is made at run time, which engines run their own way (e.g. "recursive": fib by
    #: tasks that make tasks, see bench/recursive.py); ``parents`` then only counts its tasks.
    special: str = ""

    def __post_init__(self) -> None:
        for child, ps in enumerate(self.parents):
            for p in ps:
                if not 0 <= p < child:
                    raise ValueError(f"{self.name}: node {child} has parent {p} not before it")

    @property
    def size(self) -> int:
        """Number of tasks."""
        return len(self.parents)

    @property
    def edges(self) -> int:
        """Number of dependency edges."""
        return sum(len(ps) for ps in self.parents)

    @cached_property
    def levels(self) -> tuple[int, ...]:
        """Depth of each node: 0 for roots, 1 + the deepest parent otherwise."""
        depth: list[int] = []
        for ps in self.parents:
            depth.append(1 + max(depth[p] for p in ps) if ps else 0)
        return tuple(depth)

    @property
    def depth(self) -> int:
        """Number of levels on the longest path (a chain of N has depth N)."""
        return 1 + max(self.levels) if self.parents else 0

    def layers(self) -> list[list[int]]:
        """Nodes grouped by level, in level order (what a barrier-per-layer engine runs)."""
        out: list[list[int]] = [[] for _ in range(self.depth)]
        for i, lvl in enumerate(self.levels):
            out[lvl].append(i)
        return out

    @cached_property
    def sinks(self) -> tuple[int, ...]:
        """Nodes no other node depends on: waiting on these waits on the whole graph."""
        has_child = [False] * self.size
        for ps in self.parents:
            for p in ps:
                has_child[p] = True
        return tuple(i for i, c in enumerate(has_child) if not c)

    @cached_property
    def kind(self) -> str:
        """Structure, for engines with special forms: "independent", "chain", "fanin" (n -> 1), "dag", or
        the shape's ``special`` kind (work made at run time)."""
        if self.special:
            return self.special
        if self.depth <= 1:
            return "independent"
        if self.depth == self.size:
            return "chain"
        last = self.parents[-1]
        if self.depth == 2 and len(last) == self.size - 1 and all(not ps for ps in self.parents[:-1]):
            return "fanin"
        return "dag"

    def summary(self) -> str:
        """One line: tasks, edges, depth."""
        return f"{self.name}: {self.size} tasks, {self.edges} edges, depth {self.depth} ({self.description})"


def fanout(n: int = FANOUT_N) -> Shape:
    """``n`` independent tasks."""
    return Shape("fanout", f"{n} independent tasks", tuple(() for _ in range(n)), {"n": n})


def chain(n: int = CHAIN_N) -> Shape:
    """``n`` tasks, each depending on the one before."""
    return Shape("chain", f"chain of {n}", tuple(((i - 1,) if i else ()) for i in range(n)), {"n": n})


def fanin(n: int = FANIN_N) -> Shape:
    """``n`` independent tasks then one task that depends on all of them (``n + 1`` tasks)."""
    parents: list[tuple[int, ...]] = [() for _ in range(n)]
    parents.append(tuple(range(n)))
    return Shape("fanin", f"{n} -> 1", tuple(parents), {"n": n})


def lattice(width: int = LATTICE_WIDTH, depth: int = LATTICE_DEPTH) -> Shape:
    """Layers of ``width`` nodes: node ``i`` of layer ``k`` depends on ``i-1, i, i+1`` of layer ``k-1``."""
    parents: list[tuple[int, ...]] = []
    for k in range(depth):
        for i in range(width):
            if k == 0:
                parents.append(())
            else:
                base = (k - 1) * width
                parents.append(tuple(base + j for j in (i - 1, i, i + 1) if 0 <= j < width))
    return Shape("lattice", f"diamond lattice {width} wide x {depth} deep", tuple(parents),
                 {"width": width, "depth": depth})


def random_dag(n: int = RANDOM_N, max_parents: int = RANDOM_MAX_PARENTS, seed: int = DEFAULT_SEED,
               window: int = RANDOM_WINDOW) -> Shape:
    """``n`` tasks; node ``i`` draws 0..``max_parents`` distinct parents among the ``window`` before it."""
    rng = random.Random(seed)
    parents: list[tuple[int, ...]] = []
    for i in range(n):
        lo = max(0, i - window)
        k = rng.randint(0, min(max_parents, i - lo))
        parents.append(tuple(sorted(rng.sample(range(lo, i), k))))
    return Shape("random", f"random DAG, <= {max_parents} parents, seed {seed}", tuple(parents),
                 {"n": n, "max_parents": max_parents, "seed": seed, "window": window})


def cached(n: int = FANOUT_N) -> Shape:
    """``n`` independent tasks of a cached function (``Cache``), run twice: first computed, then all
    from the cache. Part "cache" of issue 16: the second run must be at least 5x faster."""
    return Shape("cached", f"{n} independent cached tasks, run twice", tuple(() for _ in range(n)), {"n": n},
                 ours_only="a result cache of ours: the row compares our second run with our first")
def recursive(n: int) -> Shape:
    """fib(``n``) by tasks that make tasks at run time (bench/recursive.py); its size is the number of
    fib calls."""
    from bench.recursive import fib_calls

    calls = fib_calls(n)
    return Shape("recursive", f"fib({n}) by child workflows: {calls} fib calls, {(calls - 1) // 2} spawning",
                 tuple(() for _ in range(calls)), {"n": n}, special="recursive")


def _scaled(value: int, scale: float, minimum: int) -> int:
    return max(minimum, round(value * scale))


#: Builders by name, each taking the size scale and the seed.
BUILDERS: dict[str, Callable[[float, int], Shape]] = {
    "fanout": lambda s, _seed: fanout(_scaled(FANOUT_N, s, 2)),
    "chain": lambda s, _seed: chain(_scaled(CHAIN_N, s, 2)),
    "fanin": lambda s, _seed: fanin(_scaled(FANIN_N, s, 2)),
    "lattice": lambda s, _seed: lattice(_scaled(LATTICE_WIDTH, s, 3), LATTICE_DEPTH),
    "random": lambda s, seed: random_dag(_scaled(RANDOM_N, s, 10), seed=seed),
    "cached": lambda s, _seed: cached(_scaled(FANOUT_N, s, 2)),
    # fib(16) at scale 1; a tenth of the calls (--quick) is fib(11).
    "recursive": lambda s, _seed: recursive(max(2, 16 + round(math.log(max(s, 1e-3)) / math.log(1.618)))),
}

SHAPE_NAMES: tuple[str, ...] = tuple(BUILDERS)


def build(name: str, scale: float = 1.0, seed: int = DEFAULT_SEED) -> Shape:
    """Build shape ``name`` with sizes multiplied by ``scale`` (the lattice scales its width only)."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPE_NAMES)}") from None
    return builder(scale, seed)
