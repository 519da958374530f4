"""Fair share and run priority: which run's ready jobs go to a worker queue next, and how many may.

Invariant: a Celery queue (with what its workers reserved) holds at most about ``jobs_per_slot``
jobs per worker slot that no worker has started yet; the rest wait in the scheduler, one lane per run
tree, and leave in turns weighted first by tenant, then by run priority (stride scheduling). So a
small run submitted behind a 20,000-task fan-out waits for at most one such round, not for the whole
fan-out, while the fan-out keeps every slot busy.

- **What is in flight** is counted in jobs, not messages (the scheduler packs many jobs per message),
  from what was sent and what the fold saw since: a job counts from its send until its task's next
  event (TASK_STARTED, or any outcome), so the budget refills as workers claim jobs, with no polling of
  queue lengths. A job sent again (a lost worker's prefetch, a new leader) stops counting until it is
  sent again; :meth:`InFlight.reconcile` drops what the folded state no longer has queued.
- **Turns** (:class:`Turns`) are stride scheduling: a lane that takes ``n`` jobs advances its pass by
  ``n / weight``, the lane with the lowest pass goes next; a lane that comes back after being idle
  starts at the current pass (it gets no credit for its idle time). Tenants take turns with their
  weights (``NERV_TENANT_WEIGHTS``); inside a tenant its runs take turns with their priority's weight
  (``RUN_PRIORITY_WEIGHTS``). Each turn is O(log n) in the lanes with work; jobs are O(1) each.
- A run and its child runs are one lane (``Job.family``): a recursion of many small child runs is one
  submission, and competes as one.

Everything here is pure: no I/O; the caller says what was sent and what the fold saw.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nerv_cluster import constants
from nerv_cluster.errors import ConfigurationError, WorkflowError
from nerv_cluster.model import Event, EventType, TaskPriority

if TYPE_CHECKING:
    from nerv_cluster.jobs import Job

#: Where a run's tenant and priority live in its definition's ``meta`` (``client.submit``).
TENANT_META = "tenant"
PRIORITY_META = "priority"


def check_tenant(tenant: Any) -> str:
    """The tenant name as given; WorkflowError unless it is a short non-empty string."""
    if not isinstance(tenant, str) or not tenant or len(tenant) > constants.MAX_TENANT_CHARS:
        raise WorkflowError(
            f"a tenant is a string of 1 to {constants.MAX_TENANT_CHARS} characters, got {tenant!r:.80}"
        )
    return tenant


def run_meta(priority: Any, tenant: Any) -> dict[str, Any]:
    """The ``meta`` entries ``client.submit(wf, priority=, tenant=)`` adds (none for the defaults);
    WorkflowError for an unknown priority or a bad tenant."""
    meta: dict[str, Any] = {}
    if priority is not None:
        meta[PRIORITY_META] = TaskPriority.parse(priority).name
    if tenant is not None:
        meta[TENANT_META] = check_tenant(tenant)
    return meta


def run_priority(meta: Mapping[str, Any]) -> TaskPriority:
    """A run's priority from its definition's ``meta`` (MEDIUM when absent or unreadable: a run whose
    meta a client garbled still runs, at the default share)."""
    raw = meta.get(PRIORITY_META)
    if raw is None:
        return TaskPriority.MEDIUM
    try:
        return TaskPriority.parse(raw)
    except WorkflowError:
        return TaskPriority.MEDIUM


def run_tenant(meta: Mapping[str, Any]) -> str:
    """A run's tenant from its definition's ``meta`` ("" for none, or one not a string)."""
    raw = meta.get(TENANT_META)
    return raw if isinstance(raw, str) else ""


def parse_weights(entries: Iterable[str]) -> dict[str, float]:
    """``("team-a=3", "team-b=1")`` -> ``{"team-a": 3.0, "team-b": 1.0}`` (``NERV_TENANT_WEIGHTS``);
    ConfigurationError for an entry without ``=`` or with a weight that is not a positive number."""
    out: dict[str, float] = {}
    for entry in entries:
        name, sep, raw = entry.rpartition("=")
        name = name.strip()
        try:
            weight = float(raw)
        except ValueError:
            weight = 0.0
        if not sep or not name or not weight > 0 or weight == float("inf"):
            raise ConfigurationError(
                f"NERV_TENANT_WEIGHTS: {entry!r} is not TENANT=WEIGHT with a positive weight"
            )
        out[name] = weight
    return out


@dataclass(frozen=True, slots=True)
class Share:
    """Whose turn a run's jobs take: its tenant, that tenant's weight, and the run's weight in it."""

    tenant: str = ""
    tenant_weight: float = 1.0
    weight: float = constants.RUN_PRIORITY_WEIGHTS[TaskPriority.MEDIUM]


#: The share of a run with no tenant and the default priority.
DEFAULT_SHARE = Share()


def share_of(meta: Mapping[str, Any], weights: Mapping[str, float]) -> Share:
    """The share of a run with this definition ``meta``, given the tenants' ``weights``."""
    tenant = run_tenant(meta)
    return Share(tenant, weights.get(tenant, 1.0), constants.RUN_PRIORITY_WEIGHTS[run_priority(meta)])


class Turns:
    """Stride scheduling among named lanes: :meth:`peek` is the lane to serve, :meth:`charge` what it
    took. O(log n) per charge; a lane with a stale heap entry is skipped when it comes up."""

    __slots__ = ("_heap", "_pass", "_seq", "now")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        #: lane -> (pass, the sequence number of its live heap entry)
        self._pass: dict[str, tuple[float, int]] = {}
        self._seq = 0
        #: The pass of the lane served last: a lane that (re)joins starts there.
        self.now = 0.0

    def __len__(self) -> int:
        return len(self._pass)

    def __contains__(self, lane: object) -> bool:
        return lane in self._pass

    def join(self, lane: str) -> None:
        """A lane has work (again): it takes turns from the current pass on."""
        if lane not in self._pass:
            self._push(lane, self.now)

    def _push(self, lane: str, at: float) -> None:
        self._seq += 1
        self._pass[lane] = (at, self._seq)
        heapq.heappush(self._heap, (at, self._seq, lane))

    def peek(self) -> str | None:
        """The lane whose turn it is (lowest pass, then the one that joined first); None: no lanes."""
        heap, live = self._heap, self._pass
        while heap:
            at, seq, lane = heap[0]
            if live.get(lane) == (at, seq):
                return lane
            heapq.heappop(heap)
        return None

    def charge(self, lane: str, taken: int, weight: float) -> None:
        """``lane`` took ``taken`` jobs: its pass moves on by ``taken / weight``."""
        at = self._pass[lane][0]
        self.now = max(self.now, at)
        self._push(lane, at + taken / weight)

    def leave(self, lane: str) -> None:
        """A lane ran out of work (its heap entry goes stale)."""
        self._pass.pop(lane, None)
        if not self._pass:
            self._heap.clear()


class _Tenant:
    __slots__ = ("runs", "weight")

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.runs = Turns()


class FairQueue:
    """The jobs of one worker queue waiting for their turn, one FIFO lane per run tree.

    Within a lane jobs keep the order they were added in (the run's own order: priority, then rank).
    A job already waiting is not added twice: a lost worker's queues and a restarted Redis resend every
    dispatched, unstarted job, those waiting here among them.
    """

    def __init__(self) -> None:
        self._lanes: dict[str, deque[Job]] = {}
        #: (run, task, attempt) of every waiting job.
        self._members: set[tuple[str, str, int]] = set()
        self._shares: dict[str, Share] = {}
        self._tenants: dict[str, _Tenant] = {}
        self._turns = Turns()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def lanes(self) -> int:
        """Lanes with jobs waiting."""
        return len(self._lanes)

    def push(self, job: Job, share: Share) -> bool:
        """Add a job to its run tree's lane (the lane's share is the one it had when it got work);
        False when it is waiting already."""
        member = (job.run_id, job.task_id, job.attempt)
        if member in self._members:
            return False
        self._members.add(member)
        lane = job.family or job.run_id
        jobs = self._lanes.get(lane)
        if jobs is None:
            jobs = self._lanes[lane] = deque()
            self._shares[lane] = share
            tenant = self._tenants.get(share.tenant)
            if tenant is None:
                tenant = self._tenants[share.tenant] = _Tenant(share.tenant_weight)
                self._turns.join(share.tenant)
            tenant.runs.join(lane)
        jobs.append(job)
        self._size += 1
        return True

    def take(
        self, budget: int, valid: Callable[[Job], bool], quantum: int = constants.FAIR_QUANTUM
    ) -> list[Job]:
        """Up to ``budget`` jobs, in turns of at most ``quantum`` jobs. Jobs no longer ``valid`` (their
        run ended, their task was cancelled) are dropped as they come up, and cost no budget."""
        out: list[Job] = []
        turns, tenants, lanes, shares = self._turns, self._tenants, self._lanes, self._shares
        members = self._members
        while budget > 0:
            name = turns.peek()
            if name is None:
                break
            tenant = tenants[name]
            lane = tenant.runs.peek()
            if lane is None:  # (cannot happen: a tenant leaves with its last lane)
                turns.leave(name)
                del tenants[name]
                continue
            jobs = lanes[lane]
            # Alone: no one to take turns with, so no quantum (one turn, however big the budget).
            n = min(budget, len(jobs), quantum if len(lanes) > 1 else budget)
            got = 0
            while got < n and jobs:
                job = jobs.popleft()
                self._size -= 1
                members.discard((job.run_id, job.task_id, job.attempt))
                if valid(job):
                    out.append(job)
                    got += 1
            budget -= got
            if got:
                tenant.runs.charge(lane, got, shares[lane].weight)
                turns.charge(name, got, tenant.weight)
            if not jobs:
                self.forget(lane)
        return out

    def forget(self, lane: str) -> None:
        """Drop a lane and its jobs (a finished run tree)."""
        jobs = self._lanes.pop(lane, None)
        if jobs is None:
            return
        self._size -= len(jobs)
        for job in jobs:
            self._members.discard((job.run_id, job.task_id, job.attempt))
        share = self._shares.pop(lane)
        tenant = self._tenants.get(share.tenant)
        if tenant is not None:
            tenant.runs.leave(lane)
            if not len(tenant.runs):
                self._turns.leave(share.tenant)
                del self._tenants[share.tenant]


#: Task events after which a sent job no longer waits to be taken by a worker.
_LEFT = frozenset(
    {
        EventType.TASK_STARTED,
        EventType.TASK_COMPLETED,
        EventType.TASK_FAILED,
        EventType.TASK_RETRYING,
        EventType.TASK_CANCELLED,
        EventType.TASK_SKIPPED,
    }
)


class InFlight:
    """Jobs sent to each queue that no worker has started yet, by (run, task) -> (queue, attempt)."""

    __slots__ = ("_at", "count")

    def __init__(self) -> None:
        self._at: dict[tuple[str, str], tuple[str, int]] = {}
        #: queue -> jobs in flight there.
        self.count: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._at)

    def sent(self, jobs: Iterable[tuple[Job, str]]) -> None:
        """These jobs went to the broker."""
        at, count = self._at, self.count
        for job, queue in jobs:
            key = (job.run_id, job.task_id)
            old = at.get(key)
            if old is not None:
                count[old[0]] -= 1
            at[key] = (queue, job.attempt)
            count[queue] = count.get(queue, 0) + 1

    def unsent(self, jobs: Iterable[tuple[Job, str]]) -> None:
        """These jobs are to be sent again (they count from that send)."""
        for job, _ in jobs:
            self._drop((job.run_id, job.task_id))

    def _drop(self, key: tuple[str, str]) -> None:
        old = self._at.pop(key, None)
        if old is not None:
            self.count[old[0]] -= 1

    def observe(self, events: Iterable[Event]) -> None:
        """A worker took a job (TASK_STARTED), or its attempt ended some other way: it left the queue.
        O(1) per event."""
        at = self._at
        if not at:
            return
        for ev in events:
            if ev.task_id is None or ev.type not in _LEFT:
                continue
            key = (ev.run_id, ev.task_id)
            mine = at.get(key)
            if mine is not None and (ev.attempt is None or ev.attempt >= mine[1]):
                self._drop(key)

    def reconcile(self, still_queued: Callable[[str, str, int], bool]) -> None:
        """Drop every job the folded state no longer has dispatched-and-not-started (a safety net for
        an event this count missed; O(jobs in flight), which the budget bounds)."""
        for key, (_, attempt) in list(self._at.items()):
            if not still_queued(key[0], key[1], attempt):
                self._drop(key)

    def clear(self) -> None:
        """Forget everything (a leader stepping down)."""
        self._at.clear()
        self.count.clear()


def budget(in_flight: int, slots: int, jobs_per_slot: int) -> int:
    """How many more jobs a queue with ``slots`` worker slots (0: none announced yet, counted as one)
    and ``in_flight`` jobs not yet started may be sent now: none until the queue is down to
    ``FAIR_REFILL_AT`` of its round, then up to the full round. Refilling at every claimed batch sent
    one message per send (a Redis round trip and a producer per 32 jobs); at half a round each send
    carries several, and a slot still has messages ahead when the refill comes."""
    target = max(1, slots) * jobs_per_slot
    room = target - in_flight
    return room if room > 0 and in_flight <= target * constants.FAIR_REFILL_AT else 0
