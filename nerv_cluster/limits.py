"""Concurrency keys and rate limits: how many attempts of a kind may run, or start, at once, cluster-wide.

Invariant: while ``limit`` attempts with a concurrency key are dispatched or running (across all runs),
the scheduler dispatches no further task with that key; and no more than ``rate`` attempts of a rate
limit start (are dispatched) in any window of ``per`` seconds. Both are decided by the single scheduler
from its folded state, never in a worker slot:

- a READY task that may not start yet is **held**: the scheduler logs TASK_HELD, the fold moves it from
  ``RunState.ready`` to ``RunState.held`` (so deciding for its run never looks at it again), and the
  :class:`Gate` keeps it in a heap per key (or per rate limit), ordered by task priority, then submit
  order. Holding and releasing one task is O(log n) in the number held.
- the slots a key has taken are the attempts the fold says are dispatched or running (``queued`` or
  ``running``) whose TASK_DISPATCHED recorded that key (``TaskState.slot``). The gate indexes them and,
  after every folded event about a task, asks the fold whether its attempt still holds its slot: a lost
  worker, a cancel, a timeout, a failure or a finished run frees it, and a new leader rebuilds the index
  from its refold (:meth:`Gate.rebuild`).
- a rate limit's window is the start times of the attempts it dispatched (their TASK_DISPATCHED ``ts``,
  the scheduler's clock, in the log); when it is full, the gate's :meth:`Gate.next_due` is the time the
  oldest start leaves it, the scheduler's timer for the next free start (nothing polls).
- ``client.set_limit(key, n)`` is a LIMIT_SET event in the cluster-wide limits stream, which each new
  leader refolds: a changed limit survives a restart.

Everything here is pure: no I/O, the clock is an argument.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import inspect
import json
import math
import string
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nerv_cluster import constants
from nerv_cluster.errors import WorkflowError

if TYPE_CHECKING:  # the state imports the model, which imports this module
    from nerv_cluster.model import Event
    from nerv_cluster.state import RunState, State


@functools.lru_cache(maxsize=1024)
def template_fields(template: str) -> tuple[str, ...]:
    """The parameter names a key template refers to (``"tenant:{customer}"`` -> ``("customer",)``);
    WorkflowError for anything but plain ``{name}`` fields."""
    if not isinstance(template, str) or not template:
        raise WorkflowError(f"a concurrency key must be a non-empty string, got {template!r:.80}")
    if len(template) > constants.MAX_LIMIT_KEY_CHARS:
        raise WorkflowError(
            f"concurrency key {template[:40]!r}... is {len(template)} characters; the limit is "
            f"{constants.MAX_LIMIT_KEY_CHARS}"
        )
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise WorkflowError(f"concurrency key template {template!r}: {exc}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise WorkflowError(
                f"concurrency key template {template!r}: fields name a parameter, as in "
                f"'{{customer}}' (no attributes, indexes, conversions or format specs), got {{{name}}}"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def _text(value: Any) -> str:
    """A parameter's value as it appears in a key: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _resolve(value: Any, results: Callable[[str], Any]) -> Any:
    """``value`` with each task reference marker replaced by that task's result."""
    if isinstance(value, list):
        return [_resolve(v, results) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and constants.REF_KEY in value:
            return results(value[constants.REF_KEY])
        return {k: _resolve(v, results) for k, v in value.items()}
    return value


def _bounded(key: str) -> str:
    """A resolved key within the key bound: a longer one keeps its start and gets a digest of the whole."""
    if len(key) <= constants.MAX_LIMIT_KEY_CHARS:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{key[: constants.MAX_LIMIT_KEY_CHARS - 17]}#{digest}"


def _check_count(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise WorkflowError(f"{what} must be an integer >= {minimum}, got {value!r:.80}")
    return value


@dataclass(frozen=True, slots=True)
class Concurrency:
    """At most ``limit`` attempts with this key dispatched or running at once, across all runs.

    ``key`` may be a template naming the task's parameters (``"tenant:{customer}"``), filled in from
    the task's arguments (upstream results included) when the task is ready. ``Workflow.add`` binds
    the template to the call (``params``: field -> the argument's JSON, a reference for a handle); a
    template naming no parameter of the function is a WorkflowError there.
    """

    key: str
    limit: int = 1
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        template_fields(self.key)
        _check_count(self.limit, f"concurrency limit of {self.key!r}", 1)
        if not isinstance(self.params, Mapping):
            raise WorkflowError(f"concurrency params of {self.key!r} must be a mapping")

    @property
    def fields(self) -> tuple[str, ...]:
        """The parameter names the key refers to."""
        return template_fields(self.key)

    def check_parameters(self, fn: Callable[..., Any], where: str) -> None:
        """WorkflowError when the template names a parameter ``fn`` does not have."""
        params = _parameters(fn)
        if params is None:
            return
        missing = [f for f in self.fields if f not in params]
        if missing:
            raise WorkflowError(
                f"{where}: concurrency key {self.key!r} names {', '.join(map(repr, missing))}, which "
                f"{getattr(fn, '__qualname__', fn)!s} has no parameter of that name "
                f"(it has {', '.join(params) or 'none'})"
            )

    def bind(
        self,
        fn: Callable[..., Any] | None,
        context: bool,
        args: list[Any],
        kwargs: Mapping[str, Any],
        where: str,
        encode: Callable[[Any], Any],
    ) -> Concurrency:
        """This key bound to one call (``args``/``kwargs`` already JSON, handles as references):
        ``params`` holds the value of each field's parameter. ``encode`` makes a default value JSON."""
        names = self.fields
        if not names:
            return self if not self.params else Concurrency(self.key, self.limit)
        if fn is None:
            raise WorkflowError(
                f"{where}: concurrency key template {self.key!r} names parameters, so the task's "
                "function must be registered here (import its module) to bind them"
            )
        self.check_parameters(fn, where)
        sig = inspect.signature(fn)
        if context:  # fn(ctx, *args): the context is not one of the task's arguments
            sig = sig.replace(parameters=list(sig.parameters.values())[1:])
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise WorkflowError(f"{where}: the arguments do not fit the function ({exc})") from None
        given = set(bound.arguments)  # JSON already; defaults are Python values, encoded here
        bound.apply_defaults()
        params: dict[str, Any] = {}
        for name in names:
            value = bound.arguments[name]
            if isinstance(value, tuple):  # *args
                value = list(value)
            params[name] = value if name in given else encode(value)
        return Concurrency(self.key, self.limit, params)

    def resolve(self, results: Callable[[str], Any]) -> str:
        """The key of one task, its template filled in (``results``: task id -> that task's result)."""
        if not self.params:
            return self.key
        values = {name: _text(_resolve(v, results)) for name, v in self.params.items()}
        return _bounded(self.key.format(**values))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        out: dict[str, Any] = {"key": self.key, "limit": self.limit}
        if self.params:
            out["params"] = dict(self.params)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Concurrency:
        """Inverse of :meth:`to_dict`; WorkflowError on a malformed form."""
        if not isinstance(data, Mapping) or "key" not in data:
            raise WorkflowError(f"a concurrency limit needs a key, got {data!r:.80}")
        params = data.get("params") or {}
        if not params:  # a fan-out's thousands of tasks share one static key: made and checked once
            try:
                return _static_key(data["key"], data.get("limit", 1))
            except TypeError:  # unhashable: no valid key; let the checks say why
                pass
        out = cls(data["key"], data.get("limit", 1), params)
        missing = [f for f in out.fields if f not in params]
        if missing:
            raise WorkflowError(f"concurrency key {out.key!r} is not bound to {', '.join(missing)}")
        return out


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``rate`` attempt starts (dispatches) in any window of ``per`` seconds, cluster-wide, for
    every task that names this rate limit (by ``name``), across runs and workers."""

    name: str
    rate: int
    per: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > constants.MAX_LIMIT_KEY_CHARS:
            raise WorkflowError(
                f"a rate limit needs a name of 1 to {constants.MAX_LIMIT_KEY_CHARS} characters, "
                f"got {self.name!r:.80}"
            )
        _check_count(self.rate, f"rate of rate limit {self.name!r}", 1)
        per = self.per
        if isinstance(per, bool) or not isinstance(per, int | float) or not 0 < per < math.inf:
            raise WorkflowError(f"per= of rate limit {self.name!r} must be a positive number of seconds")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"name": self.name, "rate": self.rate, "per": self.per}

    @classmethod
    def from_dict(cls, data: Any) -> RateLimit:
        """Inverse of :meth:`to_dict`; WorkflowError on a malformed form."""
        if not isinstance(data, Mapping) or "name" not in data or "rate" not in data:
            raise WorkflowError(f"a rate limit needs a name and a rate, got {data!r:.80}")
        try:
            return _rate_limit(data["name"], data["rate"], data.get("per", 1.0))
        except TypeError:
            return cls(data["name"], data["rate"], data.get("per", 1.0))


@functools.lru_cache(maxsize=256, typed=True)
def _static_key(key: Any, limit: Any) -> Concurrency:
    """One Concurrency per distinct static form (typed: ``True`` is no ``1``, which the checks refuse)."""
    return Concurrency(key, limit)


@functools.lru_cache(maxsize=256, typed=True)
def _rate_limit(name: Any, rate: Any, per: Any) -> RateLimit:
    """One RateLimit per distinct form."""
    return RateLimit(name, rate, per)


def _parameters(fn: Callable[..., Any]) -> list[str] | None:
    """The names of ``fn``'s parameters (None when they cannot be read, or it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params]


def task_limits(
    tf: Any,
    concurrency: Concurrency | None,
    rate_limit: RateLimit | None,
    context: bool,
    args: list[Any],
    kwargs: Mapping[str, Any],
    where: str,
    encode: Callable[[Any], Any],
) -> tuple[Concurrency | None, RateLimit | None]:
    """The limits of one task ``Workflow.add`` builds: those given, else the ``@task`` defaults of
    ``tf`` (a TaskFunction, or None for a name registered elsewhere), the key bound to the call."""
    if concurrency is not None and not isinstance(concurrency, Concurrency):
        raise WorkflowError(f"{where}: concurrency= takes a Concurrency(key, limit), got {concurrency!r:.80}")
    if rate_limit is not None and not isinstance(rate_limit, RateLimit):
        raise WorkflowError(
            f"{where}: rate_limit= takes a RateLimit(name, rate, per=), got {rate_limit!r:.80}"
        )
    conc = concurrency if concurrency is not None else getattr(tf, "concurrency", None)
    rate = rate_limit if rate_limit is not None else getattr(tf, "rate_limit", None)
    if conc is not None:
        conc = conc.bind(getattr(tf, "fn", None), context, args, kwargs, where, encode)
    return conc, rate


def check_map(concurrency: Any) -> None:
    """WorkflowError for a key template on a map node: its elements' first argument (the element) is
    not known when the template is bound (a static key, as ``"crm-api"``, holds for every element)."""
    if isinstance(concurrency, Concurrency) and concurrency.fields:
        raise WorkflowError(
            f"map: concurrency key template {concurrency.key!r} names parameters, which a map's elements "
            "do not bind yet; use a static key (it holds for every element)"
        )


def check_limit(key: Any, limit: Any) -> None:
    """WorkflowError unless ``key`` is a valid concurrency key and ``limit`` a count >= 0 (or None:
    back to the limit the tasks declare)."""
    if not isinstance(key, str) or not key or len(key) > constants.MAX_LIMIT_KEY_CHARS:
        raise WorkflowError(
            f"a concurrency key is a string of 1 to {constants.MAX_LIMIT_KEY_CHARS} characters, "
            f"got {key!r:.80}"
        )
    if limit is not None:
        _check_count(limit, f"the limit of {key!r}", 0)


# --------------------------------------------------------------------------------------------------
# the holding structure and the window

#: A held task: (-priority, run submit time, run id, rank in its run, task id, attempt). The heap's
#: order is the release order: higher priority first, then earlier runs, then the run's own order.
Held = tuple[int, float, str, float, str, int]


class HeldQueue:
    """The tasks held behind one key or rate limit, best first; O(log n) to hold and to release.

    Entries whose task moved on meanwhile (cancelled, its run ended) are dropped as they come up
    (``valid``), and the heap is rebuilt without them once they are most of it, so memory stays
    bounded by what is held.
    """

    __slots__ = ("_heap", "_members", "_stale")

    def __init__(self) -> None:
        self._heap: list[Held] = []
        self._members: dict[tuple[str, str], int] = {}
        self._stale = 0

    def push(self, item: Held) -> None:
        """Hold a task (one that is held already keeps its place)."""
        at = (item[2], item[4])
        if self._members.get(at) == item[5]:
            return
        self._members[at] = item[5]
        heapq.heappush(self._heap, item)

    def pop(self, valid: Callable[[str, str, int], bool]) -> Held | None:
        """The best held task still ``valid`` (run id, task id, attempt), taken out; None when none is."""
        heap = self._heap
        while heap:
            item = heapq.heappop(heap)
            at = (item[2], item[4])
            if self._members.get(at) != item[5]:
                self._stale = max(0, self._stale - 1)
                continue  # a duplicate of an attempt held again later
            del self._members[at]
            if valid(item[2], item[4], item[5]):
                return item
        return None

    def forget_run(self, run_id: str, task_ids: Iterable[str]) -> None:
        """Drop the entries of these tasks of a finished run (lazily: the heap keeps them until they
        come up, or until they are most of it)."""
        for tid in task_ids:
            if self._members.pop((run_id, tid), None) is not None:
                self._stale += 1
        if self._stale > 1024 and self._stale * 2 > len(self._heap):
            members = self._members
            self._heap = [h for h in self._heap if members.get((h[2], h[4])) == h[5]]
            heapq.heapify(self._heap)
            self._stale = 0

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, at: object) -> bool:
        return at in self._members


class Window:
    """The start times of one rate limit within its last ``per`` seconds (oldest first)."""

    __slots__ = ("per", "rate", "starts")

    def __init__(self, rate: int, per: float) -> None:
        self.rate, self.per = rate, per
        self.starts: deque[float] = deque()

    def _expire(self, now: float) -> None:
        starts, edge = self.starts, now - self.per
        while starts and starts[0] <= edge:
            starts.popleft()

    def free(self, now: float) -> int:
        """How many attempts may start at ``now``: a start at ``now`` must leave at most ``rate``
        starts in ``(now - per, now]``."""
        self._expire(now)
        return max(0, self.rate - len(self.starts))

    def next_free(self, now: float) -> float:
        """When the next start may happen (``now`` if one may now)."""
        if self.free(now) > 0:
            return now
        # The start that must leave the window for one more to fit.
        return self.starts[len(self.starts) - self.rate] + self.per

    def start(self, at: float) -> None:
        """Record a start (times come in order on the scheduler's clock; an earlier one is sorted in)."""
        starts = self.starts
        if not starts or at >= starts[-1]:
            starts.append(at)
        else:
            items = sorted([*starts, at])
            starts.clear()
            starts.extend(items)

    def resize(self, rate: int, per: float) -> None:
        """Take a rate limit's current form (tasks declare it; the latest declaration wins)."""
        self.rate, self.per = rate, per


# --------------------------------------------------------------------------------------------------
# the gate


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :meth:`Gate.admit` decided for a ready task: ``go`` (with the concurrency key whose slot
    it took, if any, and the rate limit it started under), or held (``reason`` says by what)."""

    go: bool
    slot: str | None = None
    rate: str | None = None
    reason: str = ""


_GO = Verdict(True)


class Gate:
    """Every concurrency key's slots and held tasks, and every rate limit's window and held tasks."""

    def __init__(self) -> None:
        #: Limits set at run time (``client.set_limit``), by key; they override the declared ones.
        self.overrides: dict[str, int] = {}
        #: The limit tasks last declared for each key.
        self.declared: dict[str, int] = {}
        #: key -> {(run, task): attempt} of the attempts holding one of its slots.
        self.active: dict[str, dict[tuple[str, str], int]] = {}
        #: (run, task) -> (key, attempt): the slot each attempt holds.
        self.slots: dict[tuple[str, str], tuple[str, int]] = {}
        #: run -> its tasks in ``slots`` (so a finished run is forgotten without a scan of its tasks).
        self._run_slots: dict[str, set[str]] = {}
        self.by_key: dict[str, HeldQueue] = {}
        self.by_rate: dict[str, HeldQueue] = {}
        self.windows: dict[str, Window] = {}
        #: Tasks released from a heap, by run: the scheduler decides for them (their slot or start is
        #: reserved: ``_granted``/``_started``).
        self.released: dict[str, list[str]] = {}
        self._granted: set[tuple[str, str]] = set()
        self._started: set[tuple[str, str]] = set()
        #: Keys that may have a free slot and held tasks.
        self._dirty: set[str] = set()
        #: When this scheduler became leader (see :meth:`rebuild`); None: the gate starts empty.
        self.since: float | None = None

    # -- limits ---------------------------------------------------------------------------------------

    def limit(self, key: str) -> int:
        """The limit of ``key``: set at run time, else as declared (1 for a key never seen)."""
        return self.overrides.get(key, self.declared.get(key, 1))

    def set_limit(self, key: str, limit: int | None) -> None:
        """A LIMIT_SET: ``limit`` from now on (None: back to the declared one)."""
        if limit is None:
            self.overrides.pop(key, None)
        else:
            self.overrides[key] = limit
        self._dirty.add(key)

    def apply_limit_event(self, ev: Event) -> None:
        """Fold one LIMIT_SET event (malformed ones change nothing)."""
        key, limit = ev.data.get("key"), ev.data.get("limit")
        try:
            check_limit(key, limit)
        except WorkflowError:
            return
        self.set_limit(key, limit)  # type: ignore[arg-type]

    def in_use(self, key: str) -> int:
        """Slots of ``key`` taken."""
        return len(self.active.get(key, ()))

    def held(self, key: str) -> int:
        """Tasks held behind ``key``."""
        queue = self.by_key.get(key)
        return len(queue) if queue is not None else 0

    # -- admission ------------------------------------------------------------------------------------

    def admit(self, run: RunState, tid: str, now: float) -> Verdict:
        """May ready task ``tid`` of ``run`` start now? If so its slot and start are taken; if not it
        is held (pushed into the heap it waits in), and the verdict says why."""
        td = run.defs[tid]
        conc, rl = td.concurrency, td.rate_limit
        if conc is None and rl is None:
            return _GO
        rid = run.run_id
        at = (rid, tid)
        ts = run.tasks[tid]
        key = None
        if conc is not None:
            tasks = run.tasks
            key = conc.resolve(lambda dep: tasks[dep].result)
            self.declared[key] = conc.limit
            if at in self._granted:
                self._granted.discard(at)  # released from the heap with its slot taken
            else:
                queue = self.by_key.get(key)
                if (queue is not None and len(queue)) or self.in_use(key) >= self.limit(key):
                    if queue is not None and len(queue) and self.in_use(key) < self.limit(key):
                        self._dirty.add(key)  # hold it behind the others; the best goes next
                    self._hold(self.by_key, key, run, tid, ts.attempt)
                    return Verdict(False, reason=f"concurrency key {key!r} is at its limit")
                self._take(key, at, ts.attempt)
        if rl is not None:
            window = self._window(rl.name, rl.rate, rl.per)
            if at in self._started:
                self._started.discard(at)
            else:
                queue = self.by_rate.get(rl.name)
                if (queue is not None and len(queue)) or window.free(now) <= 0:
                    if key is not None:  # give the slot back: it starts later, and must take it then
                        self._free(at)
                    self._hold(self.by_rate, rl.name, run, tid, ts.attempt)
                    return Verdict(False, reason=f"rate limit {rl.name!r} is at {rl.rate} per {rl.per}s")
                window.start(now)
        return Verdict(True, key, rl.name if rl is not None else None)

    def _window(self, name: str, rate: int, per: float) -> Window:
        window = self.windows.get(name)
        if window is None:
            window = self.windows[name] = Window(rate, per)
            if self.since is not None:
                # A new leader does not know the starts of runs that ended before its refold: the
                # window counts as full at the takeover (conservative: a start is never one too many).
                window.starts.extend([self.since] * rate)
        elif window.rate != rate or window.per != per:
            window.resize(rate, per)
        return window

    def _hold(self, heaps: dict[str, HeldQueue], name: str, run: RunState, tid: str, attempt: int) -> None:
        queue = heaps.get(name)
        if queue is None:
            queue = heaps[name] = HeldQueue()
        prio = int(run.defs[tid].priority)
        queue.push((-prio, run.submitted_at, run.run_id, run.plan.rank[tid], tid, attempt))

    def _take(self, key: str, at: tuple[str, str], attempt: int) -> None:
        old = self.slots.get(at)
        if old is not None:
            self._free(at)
        self.active.setdefault(key, {})[at] = attempt
        self.slots[at] = (key, attempt)
        self._run_slots.setdefault(at[0], set()).add(at[1])

    def _free(self, at: tuple[str, str]) -> None:
        slot = self.slots.pop(at, None)
        if slot is None:
            return
        mine = self._run_slots.get(at[0])
        if mine is not None:
            mine.discard(at[1])
            if not mine:
                del self._run_slots[at[0]]
        holders = self.active.get(slot[0])
        if holders is not None:
            holders.pop(at, None)
            if not holders:
                del self.active[slot[0]]
        self._dirty.add(slot[0])

    # -- release --------------------------------------------------------------------------------------

    def release(self, now: float, state: State) -> set[str]:
        """Take held tasks out of their heaps while their key has free slots (or their rate limit free
        starts), reserving those; add them to :attr:`released`. Returns the runs to decide for.

        Looks only at keys whose slots were freed or whose limit changed, and at rate limits whose
        window has room: O(log n) per released task, nothing per task still held."""
        runs = state.runs

        def valid(rid: str, tid: str, attempt: int) -> bool:
            run = runs.get(rid)
            if run is None or run.cancel_requested or run.status.terminal:
                return False
            ts = run.tasks.get(tid)
            return ts is not None and ts.held and ts.attempt == attempt and not ts.dispatched

        touched: set[str] = set()
        dirty, self._dirty = self._dirty, set()
        for key in dirty:
            queue = self.by_key.get(key)
            if queue is None:
                continue
            free = self.limit(key) - self.in_use(key)
            while free > 0:
                item = queue.pop(valid)
                if item is None:
                    break
                rid, tid, attempt = item[2], item[4], item[5]
                self._take(key, (rid, tid), attempt)
                self._granted.add((rid, tid))
                self.released.setdefault(rid, []).append(tid)
                touched.add(rid)
                free -= 1
            if not len(queue):
                del self.by_key[key]
        if self.by_rate:
            for name in list(self.by_rate):
                queue = self.by_rate[name]
                window = self.windows[name]
                free = window.free(now)
                while free > 0:
                    item = queue.pop(valid)
                    if item is None:
                        break
                    rid, tid = item[2], item[4]
                    window.start(now)
                    self._started.add((rid, tid))
                    self.released.setdefault(rid, []).append(tid)
                    touched.add(rid)
                    free -= 1
                if not len(queue):
                    del self.by_rate[name]
        return touched

    def take_released(self, run_id: str) -> list[str]:
        """The tasks of ``run_id`` released for deciding (and forgets them)."""
        return self.released.pop(run_id, [])

    def next_due(self, now: float) -> float | None:
        """When a held rate-limited task may start next: the scheduler's timer (None: none held)."""
        due = None
        for name, queue in self.by_rate.items():
            if len(queue):
                at = self.windows[name].next_free(now)
                due = at if due is None else min(due, at)
        return due

    def pending(self) -> bool:
        """Whether :meth:`release` may have work now (a key with a freed slot and held tasks)."""
        return any(key in self.by_key for key in self._dirty)

    # -- following the fold ---------------------------------------------------------------------------

    def observe(self, events: Iterable[Event], state: State) -> None:
        """After ``events`` were folded into ``state``: free the slot of every attempt they ended (the
        fold says whether an attempt still holds its slot). O(1) per event."""
        slots = self.slots
        if not slots:
            return
        runs = state.runs
        for ev in events:
            tid = ev.task_id
            if tid is None:
                continue
            at = (ev.run_id, tid)
            slot = slots.get(at)
            if slot is None:
                continue
            run = runs.get(ev.run_id)
            if run is None or not _holds(run, tid, slot):
                self._free(at)

    def forget(self, runs: Iterable[RunState]) -> None:
        """Finished runs leave: free their slots and drop their held entries."""
        for run in runs:
            rid = run.run_id
            for tid in list(self._run_slots.get(rid, ())):
                self._free((rid, tid))
            self.released.pop(rid, None)
            if self._granted:
                self._granted = {at for at in self._granted if at[0] != rid}
            if self._started:
                self._started = {at for at in self._started if at[0] != rid}
            held = list(run.held)
            if held:
                for queue in (*self.by_key.values(), *self.by_rate.values()):
                    queue.forget_run(rid, held)

    def clear(self) -> None:
        """Forget everything but the run-time limits (a leader stepping down)."""
        self.declared.clear()
        self.active.clear()
        self.slots.clear()
        self._run_slots.clear()
        self.by_key.clear()
        self.by_rate.clear()
        self.windows.clear()
        self.released.clear()
        self._granted.clear()
        self._started.clear()
        self._dirty.clear()
        self.since = None

    def rebuild(self, state: State, now: float) -> None:
        """A new leader: slots from the folded state, every held task back into its heap (the
        run-time limits are kept: the limits stream is refolded beside). A rate limit's window starts
        full at ``now`` (see :meth:`_window`): starts of runs that ended before the refold are not in
        the state, so none starts within ``per`` of the takeover."""
        self.clear()
        self.since = now
        for run in state.runs.values():
            rid = run.run_id
            tasks, defs = run.tasks, run.defs
            for tid in (*run.running, *run.queued):
                ts = tasks[tid]
                if ts.slot is not None:
                    self._take(ts.slot, (rid, tid), ts.attempt)
            for tid in run.held:
                td, ts = defs[tid], tasks[tid]
                if td.rate_limit is not None:
                    rl = td.rate_limit
                    self._window(rl.name, rl.rate, rl.per)
                if td.concurrency is not None:
                    key = td.concurrency.resolve(lambda dep, tasks=tasks: tasks[dep].result)  # type: ignore[misc]
                    self.declared[key] = td.concurrency.limit
                    self._hold(self.by_key, key, run, tid, ts.attempt)
                    self._dirty.add(key)
                elif td.rate_limit is not None:
                    self._hold(self.by_rate, td.rate_limit.name, run, tid, ts.attempt)


def _holds(run: RunState, tid: str, slot: tuple[str, int]) -> bool:
    """Whether ``tid``'s current attempt still holds ``slot``: dispatched or running, with that key."""
    ts = run.tasks.get(tid)
    if ts is None or ts.attempt != slot[1]:
        return False
    if tid not in run.queued and tid not in run.running:
        return False
    # Recorded by the fold from TASK_DISPATCHED; still None while the dispatch is being written.
    return ts.slot is None or ts.slot == slot[0]
