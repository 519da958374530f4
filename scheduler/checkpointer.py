"""Checkpointing active runs from a background thread (see :mod:`nerv_cluster.checkpoint`).

A checkpoint is the fold of a run's log up to a known entry, so it is built from the log, not from the
scheduler's live state (which folds the feed). Each run's last checkpoint state stays in memory and the
next one extends it with the log entries after it: every entry is folded twice in all, and a run is
checkpointed only after gaining at least as many entries as it has tasks, so encoding costs O(1) per
entry. The work runs in a thread so a big run's checkpoint never stalls the scheduler loop (whose
lease keeper lets the lease lapse when the loop stops moving).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping

from nerv_cluster import checkpoint, constants
from nerv_cluster import state as st
from nerv_cluster.errors import MalformedCheckpointError
from nerv_cluster.eventlog import EventLog
from nerv_cluster.intake import describe

log = logging.getLogger("nerv.scheduler")

#: Where a run's last checkpoint is: (log entry id, entries covered, the run's state there).
Position = tuple[str, int, st.RunState]


def load(eventlog: EventLog, run_ids: list[str]) -> dict[str, Position]:
    """The runs' stored checkpoints, decoded. One that cannot be read is skipped (with a warning):
    that run's whole log is replayed instead."""
    out: dict[str, Position] = {}
    for rid, raw in eventlog.read_checkpoints(run_ids).items():
        try:
            data = json.loads(raw)
            upto, count = data["upto"], data["count"]
            if not isinstance(upto, str) or type(count) is not int or count < 1:
                raise ValueError(f"no log position: upto {upto!r:.40}, count {count!r:.20}")
            out[rid] = (upto, count, checkpoint.decode(data["state"]))
        except (KeyError, TypeError, ValueError, RecursionError, MalformedCheckpointError) as exc:
            log.warning("ignoring the checkpoint of run %s (%s); replaying its whole log", rid, describe(exc))
    return out


class Checkpointer:
    """Checkpoints the runs ``runs()`` returns, every ``CHECKPOINT_INTERVAL_S``, from a daemon thread."""

    def __init__(self, eventlog: EventLog, every: int, runs: Callable[[], Mapping[str, st.RunState]]) -> None:
        self.log = eventlog
        self.every = every
        self.runs = runs
        self._positions: dict[str, Position] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reset(self, positions: Mapping[str, Position]) -> None:
        """Start over from these positions (a new leader's refold, or nothing after stepping down)."""
        with self._lock:
            self._positions = dict(positions)

    def track(self, positions: Mapping[str, Position]) -> None:
        """Runs taken back (a rerun reopened them): checkpoint them from these positions on."""
        with self._lock:
            self._positions.update(positions)

    def forget(self, run_id: str) -> None:
        """A run is over: drop its position."""
        with self._lock:
            self._positions.pop(run_id, None)

    def start(self) -> None:
        """Checkpoint from a daemon thread until :meth:`stop` (nothing when checkpoints are off)."""
        if not self.every:
            return

        def loop() -> None:
            while not self._stop.wait(constants.CHECKPOINT_INTERVAL_S):
                try:
                    self.run_once()
                except Exception as exc:  # Redis away, or a bug: the next round tries again
                    log.warning("checkpointing failed: %s", exc)

        self._thread = threading.Thread(target=loop, name="nerv-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def run_once(self) -> int:
        """Checkpoint every run whose log grew enough since its last checkpoint; returns how many."""
        runs = self.runs()
        if not self.every or not runs:
            return 0
        run_ids = list(runs.keys())
        done = 0
        for rid, length in zip(run_ids, self.log.log_lengths(run_ids), strict=True):
            with self._lock:
                upto, count, base = self._positions.get(rid, ("", 0, None))
            if length - count < max(self.every, runs[rid].total):
                continue
            entries = list(self.log.read_run(rid, after=upto or "-"))
            run = st.fold_run(base, [ev for _, ev in entries])
            if not entries or run is None:
                continue
            upto, count = entries[-1][0], count + len(entries)
            state = checkpoint.encode(run)
            if not self.log.write_checkpoint(rid, {"upto": upto, "count": count, "state": state}):
                continue  # the run was closed meanwhile
            with self._lock:
                if rid in self._positions or rid in self.runs():  # not finished meanwhile
                    self._positions[rid] = (upto, count, run)
            log.info("checkpointed run %s at log entry %d", rid, count)
            done += 1
        return done
