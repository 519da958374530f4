"""The scheduler's cache room: keys of cacheable READY tasks, one round trip per step to store and read
entries, and the in-flight map (see :mod:`nerv_cluster.caching`, which holds the pure part).

The loop calls :meth:`CacheRoom.prepare` before deciding (it returns the :class:`CacheView` ``decide``
takes), :meth:`CacheRoom.observe` after every fold (owners that ended are released, their waiters'
runs decided again, computed results queued for storing), :meth:`CacheRoom.forget` when it evicts a
run, and :meth:`CacheRoom.rebuild` after a refold.

Invariant: the owners of :class:`Flights` are those of the folded state (rebuilt after each refold,
kept by ``observe``), and a result a task computed is stored once its completion is folded, in the next
round trip, before any lookup of that step; a new leader stores again (only where absent) every computed
result of the runs it holds, so a leader that died between folding a completion and storing it loses no
entry. Custom key functions (``Cache.key``) run here, in the scheduler: their modules are imported from
``NERV_SCHEDULER_MODULES`` (``nerv scheduler --app MODULE``); a hit must cost no worker round trip, so
the key cannot wait for a worker.
"""

from __future__ import annotations

import importlib
import logging
import traceback
from collections.abc import Callable, Iterable, Sequence

from nerv_cluster import caching
from nerv_cluster.cachestore import CacheStore, Store
from nerv_cluster.caching import CacheView, Entry, Flights
from nerv_cluster.errors import CacheKeyError, ConfigurationError
from nerv_cluster.jobs import build_job
from nerv_cluster.model import Event, EventType, TaskError, TaskStatus
from nerv_cluster.registry import Registry, default_registry
from nerv_cluster.state import RunState, State

log = logging.getLogger("nerv.scheduler")


def import_modules(modules: Iterable[str]) -> None:
    """Import the modules that register custom cache key functions (ConfigurationError naming one that
    cannot be imported)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigurationError(
                f"the scheduler cannot import {name!r} (NERV_SCHEDULER_MODULES / --app): {exc}"
            ) from exc


class CacheRoom:
    """Owns the in-flight map, the computed keys of READY cacheable tasks and the entries to store."""

    def __init__(
        self,
        store: CacheStore,
        token: Callable[[], str],
        clock: Callable[[], float],
        registry: Registry = default_registry,
    ) -> None:
        self.store = store
        self.token = token
        self.clock = clock
        self.registry = registry
        self.flights = Flights()
        #: run -> task -> key (or why it has none) of its READY cacheable tasks: computed once per task.
        self._keys: dict[str, dict[str, str | TaskError]] = {}
        #: run -> whether any of its tasks is cacheable (decided once per run).
        self._cacheable: dict[str, bool] = {}
        self._pending: list[Store] = []

    def clear(self) -> None:
        """Forget everything (stepping down; the next leader rebuilds)."""
        self.flights.clear()
        self._keys.clear()
        self._cacheable.clear()
        self._pending = []

    def _has_cache(self, run: RunState) -> bool:
        known = self._cacheable.get(run.run_id)
        if known is None:
            known = self._cacheable[run.run_id] = any(td.cache is not None for td in run.defs.values())
        return known

    # -- keys -------------------------------------------------------------------------------------------

    def key_of(self, run: RunState, tid: str) -> str | TaskError:
        """The cache key of a READY task (its upstream results are in), or why it has none."""
        td = run.defs[tid]
        cache = td.cache
        assert cache is not None
        if td.dependencies:  # the arguments as the job will carry them: upstream results in place
            job = build_job(run, tid)
            args, kwargs, context = job.args, job.kwargs, job.context
        else:  # nothing to resolve (a fan-out's tasks): skip building a job
            args, kwargs, context = list(td.args), dict(td.kwargs), {} if td.context else None
        name = cache.key_name
        try:
            if name is None:
                return caching.default_key(td.fn, cache, args, kwargs, context)
            tf = self.registry.get(name)
            if tf is None:
                raise CacheKeyError(
                    f"the cache key function {name!r} of task {tid!r} is not registered in the scheduler; "
                    "start it with the module that defines it (nerv scheduler --app MODULE, or "
                    "NERV_SCHEDULER_MODULES)"
                )
            try:
                value = tf.fn(args, kwargs)
            except Exception as exc:
                raise CacheKeyError(
                    f"the cache key function {name!r} of task {tid!r} raised {type(exc).__name__}: {exc}"
                ) from exc
            return caching.custom_key(td.fn, cache, value)
        except (CacheKeyError, TypeError, ValueError) as exc:  # TypeError/ValueError: no canonical JSON
            log.warning("task %s/%s has no cache key: %s", run.run_id, tid, exc)
            return TaskError.from_exception(exc, traceback.format_exc())

    # -- the step's round trip ----------------------------------------------------------------------------

    def prepare(self, touched: Iterable[str], state: State) -> CacheView | None:
        """The cache as ``decide`` needs it for the ``touched`` runs: the keys of their cacheable READY
        tasks and the entries found for them, read in one round trip that first stores the entries
        waiting to be stored. None when no touched run has a cacheable task (nothing to read)."""
        keys: dict[tuple[str, str], str | TaskError] = {}
        lookups: dict[str, str] = {}  # key -> Redis key
        refresh: set[str] = set()
        flights = self.flights
        for rid in touched:
            run = state.runs.get(rid)
            if run is None or not run.ready or run.status.terminal or run.rejected or run.cancel_requested:
                continue
            if not self._has_cache(run):
                continue
            fresh = caching.is_refresh(run.definition.meta)
            if fresh:
                refresh.add(rid)
            memo = self._keys.setdefault(rid, {})
            defs = run.defs
            for tid in run.ready:
                td = defs[tid]
                if td.cache is None:
                    continue
                key = memo.get(tid)
                if key is None:
                    key = memo[tid] = self.key_of(run, tid)
                keys[rid, tid] = key
                # A key someone computes now has no entry worth reading: the task is held anyway.
                if isinstance(key, str) and not fresh and not flights.busy(key, rid, tid):
                    lookups[key] = self.store.keys.cache_entry(td.fn, key)
        if not keys:
            self.flush()
            return None
        entries: dict[str, Entry] = {}
        if lookups or self._pending:
            stores, self._pending = self._pending, []
            values = self.store.exchange(self.token(), stores, list(lookups.values()))
            for key, raw in zip(lookups, values, strict=True):
                entry = Entry.parse(raw)
                if entry is not None:
                    entries[key] = entry
        return CacheView(keys, entries, frozenset(refresh), flights, set())

    def flush(self) -> None:
        """Store the entries waiting to be stored (the round trip ``prepare`` makes when it has reads)."""
        if self._pending:
            stores, self._pending = self._pending, []
            self.store.exchange(self.token(), stores, [])

    # -- following the fold -------------------------------------------------------------------------------

    def observe(self, events: Iterable[Event], state: State) -> set[str]:
        """After ``events`` were folded into ``state``: claim dispatched keys, release owners that ended
        (queueing their computed results for storing) and drop keys of tasks no longer READY. Returns
        the runs whose held tasks should be decided again."""
        woken: set[str] = set()
        flights = self.flights
        for ev in events:
            tid = ev.task_id
            if tid is None:
                if ev.type is EventType.CACHE_HITS:  # completed: their keys are spent
                    memo = self._keys.get(ev.run_id)
                    rows = ev.data.get("hits")
                    if memo and isinstance(rows, list):
                        for row in rows:  # as the fold reads them: a malformed one drops nothing
                            if isinstance(row, list) and row and isinstance(row[0], str):
                                memo.pop(row[0], None)
                continue
            rid = ev.run_id
            owned = flights.key_of(rid, tid)
            memo = self._keys.get(rid)
            claims = ev.type is EventType.TASK_DISPATCHED and "cache_key" in ev.data
            if owned is None and not claims and (memo is None or tid not in memo):
                continue
            run = state.runs.get(rid)
            ts = run.tasks.get(tid) if run is not None else None
            if memo is not None and (ts is None or ts.status is not TaskStatus.READY):
                memo.pop(tid, None)
            if ts is None or run is None:
                if owned is not None:
                    woken |= flights.release(rid, tid)[1]
                continue
            if not ts.status.terminal:
                if ts.cache_key is not None and ts.dispatched:
                    flights.claim(ts.cache_key, rid, tid)
                continue
            if owned is not None:
                woken |= flights.release(rid, tid)[1]
                self._store_result(run, tid, self.clock())
        return woken

    def _store_result(self, run: RunState, tid: str, now: float, only_new: bool = False) -> None:
        """Queue the entry of a task that COMPLETED by computing (not from the cache)."""
        ts, td = run.tasks[tid], run.defs[tid]
        if (
            td.cache is None
            or ts.cache_key is None
            or not caching.completed_uncached(ts.status, ts.cached_from)
        ):
            return
        ttl_ms = td.cache.ttl_ms
        if only_new:  # re-stored after a takeover: only what is left of its life
            ttl_ms -= int(1000 * max(0.0, now - (ts.finished_at or now)))
            if ttl_ms <= 0:
                return
        entry = Entry(ts.result, run.run_id, tid, ts.attempt, now)
        key = self.store.keys.cache_entry(td.fn, ts.cache_key)
        self._pending.append((key, entry.to_json(), ttl_ms, only_new))

    def forget(self, run_ids: Sequence[str]) -> set[str]:
        """Runs the scheduler evicted: release their owners; the runs whose held tasks wake."""
        woken: set[str] = set()
        for rid in run_ids:
            self._keys.pop(rid, None)
            self._cacheable.pop(rid, None)
            woken |= self.flights.release_run(rid)
        return woken - set(run_ids)

    def rebuild(self, state: State) -> None:
        """After a refold: the owners of the folded state, and every computed result of the runs held
        queued for storing again where no entry exists (the last leader may have died before storing)."""
        self.clear()
        runs = [run for run in state.runs.values() if self._has_cache(run)]
        self.flights.rebuild(runs)
        now = self.clock()
        for run in runs:
            for tid, ts in run.tasks.items():
                if ts.cache_key is not None and ts.status is TaskStatus.COMPLETED:
                    self._store_result(run, tid, now, only_new=True)
        if runs:
            log.info(
                "cache: %d keys in flight, %d results to store again", len(self.flights), len(self._pending)
            )
