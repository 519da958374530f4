"""Process memory for the benchmarks: peak resident memory from ``/proc/<pid>/status``, and a watcher
that samples a process tree and can stop it past a bound.

``VmHWM`` is the kernel's high-water mark of a process's resident set over its whole life, so a
process measured this way is started fresh for the run it measures (``bench.scale`` does).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

#: Where the kernel says how much memory a process holds.
PROC = Path("/proc")


def parse_status(text: str) -> dict[str, int]:
    """The ``kB`` fields of a ``/proc/<pid>/status`` text, in bytes (``VmRSS``, ``VmHWM``, ...)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024
    return out


def status(pid: int) -> dict[str, int]:
    """The memory fields of process ``pid`` in bytes (empty once it is gone)."""
    try:
        return parse_status((PROC / str(pid) / "status").read_text())
    except OSError:
        return {}


def peak_rss(pid: int) -> int | None:
    """The process's peak resident set in bytes (``VmHWM``), None once it is gone."""
    return status(pid).get("VmHWM")


def rss(pid: int) -> int | None:
    """The process's resident set now in bytes (``VmRSS``), None once it is gone."""
    return status(pid).get("VmRSS")


class Watch:
    """Samples the summed resident set of ``pids()`` every ``interval`` seconds in a thread; keeps the
    highest sum, and calls ``over(total)`` once if it passes ``limit`` bytes (0: no limit)."""

    def __init__(
        self,
        pids: Callable[[], list[int]],
        interval: float = 0.5,
        limit: int = 0,
        over: Callable[[int], None] | None = None,
    ) -> None:
        self.pids = pids
        self.interval = interval
        self.limit = limit
        self.over = over
        self.peak = 0
        self.tripped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memwatch", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            total = sum(r for r in map(rss, self.pids()) if r is not None)
            self.peak = max(self.peak, total)
            if self.limit and total > self.limit and not self.tripped:
                self.tripped = True
                if self.over is not None:
                    self.over(total)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
