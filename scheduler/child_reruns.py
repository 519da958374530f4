"""Rerunning child runs for their parent tasks (see :mod:`nerv_cluster.children`, "rerun").

A rerun of a parent run leaves each task whose child run failed waiting for that child to be rerun
(``children.awaits_rerun``); ``decide`` names those (``Decisions.child_reruns``) and this room does the
I/O: it reads the child run (held in memory, else a one-run load from its checkpoint and log), judges
it (``children.judge``, pure) and then reruns it through ``rerun.lua`` fenced by the lease (its
WORKFLOW_RERUN_REQUESTED names the parent's new attempt), records CHILD_STARTED in the parent's log,
gives the task a new attempt when the child cannot be rerun, or waits for a child still going.

Invariant: a child is rerun only while its own log says it belongs to an older attempt of its parent
task, and the rerun itself is what changes that (atomically, in ``rerun.lua``, which also refuses a
request judged on a log that moved since), so whatever crash comes between the writes here, no child
run is rerun twice for one attempt; a new leader judges again from the logs and finds the same.

The room's only state, the children it waits for, is rebuilt from the folded state: a new leader
decides for every run, which names every waiting task again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from nerv_cluster import children
from nerv_cluster import state as st
from nerv_cluster.children import ChildRerun, Rerun
from nerv_cluster.errors import RunMovedError, RunNotFoundError
from nerv_cluster.eventlog import EventLog
from nerv_cluster.model import WORKFLOW_END_EVENTS, Event
from scheduler.takeover import load_runs

log = logging.getLogger("nerv.scheduler")


class ChildReruns:
    """Reruns child runs for their parent tasks; remembers the children still going it waits for."""

    def __init__(self, eventlog: EventLog) -> None:
        self.log = eventlog
        #: Child run id -> the parent run waiting for its end to rerun it (decided again then).
        self.waiting: dict[str, str] = {}
        #: Parent runs whose child's rerun was refused as its log moved: decided again next step.
        self.retry: set[str] = set()

    def clear(self) -> None:
        """Forget everything (a new leader decides again for every run)."""
        self.waiting.clear()
        self.retry.clear()

    def retries(self) -> set[str]:
        """The parent runs to decide for again in this step (see :attr:`retry`), once."""
        out, self.retry = self.retry, set()
        return out

    def _child(self, child_id: str, state: st.State) -> tuple[st.RunState | None, str]:
        """The child run as its log has it, and the log's last entry id (the rerun's ``expected``).
        The raw end is read first: the fold covers at least up to it (a later entry makes
        ``rerun.lua`` refuse, and the rerun is judged again)."""
        last = self.log.last_entry(child_id)
        if last is None:
            return None, ""
        held = state.runs.get(child_id)
        if held is not None:
            return held, last
        return load_runs(self.log, [child_id]).runs.get(child_id), last

    def act(
        self, intents: Sequence[ChildRerun], state: st.State, token: str, now: float, source: str
    ) -> list[Event]:
        """Do what each of ``intents`` needs; the events for the parents' logs to write (fenced) and
        fold: CHILD_STARTED, or a new attempt. A rerun refused because the child's log moved meanwhile
        is judged again next step (:meth:`retries`), on the log as it is then."""
        events: list[Event] = []
        for intent in intents:
            child, last = self._child(intent.child_id, state)
            verdict = children.judge(intent, child)
            if verdict is Rerun.RERUN and child is not None:
                try:
                    self.log.rerun(children.rerun_event(intent, child, now, source), last, token=token)
                except RunMovedError:
                    self.retry.add(intent.parent.run_id)
                    continue
                except RunNotFoundError:
                    verdict = Rerun.ANEW
                else:
                    log.info(
                        "child run %r rerun (rerun %d) for %s/%s attempt %d",
                        intent.child_id,
                        child.reruns + 1,
                        intent.parent.run_id,
                        intent.parent.task_id,
                        intent.parent.attempt,
                    )
                    verdict = Rerun.RECORD
            if verdict is Rerun.RECORD:
                self.waiting.pop(intent.child_id, None)
                events.append(children.rerun_recorded(intent, now, source))
            elif verdict is Rerun.WAIT:
                self.waiting[intent.child_id] = intent.parent.run_id
            else:
                self.waiting.pop(intent.child_id, None)
                why = "its log is gone" if child is None else "it is no child run of that task any more"
                if child is not None and child.rejected:
                    why = "it was refused"
                log.warning("child run %r cannot be rerun (%s): a new attempt", intent.child_id, why)
                events.append(children.rerun_anew(intent, why, now, source))
        return events

    def ended(self, events: Iterable[Event]) -> set[str]:
        """The parent runs to decide for again because a child they wait for ended in ``events``."""
        if not self.waiting:
            return set()
        return {
            self.waiting.pop(ev.run_id)
            for ev in events
            if ev.type in WORKFLOW_END_EVENTS and ev.run_id in self.waiting
        }
