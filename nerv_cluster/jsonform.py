"""The JSON text nerv writes: compact, and canonical where it is hashed.

Invariant: :func:`compact` and :func:`canonical` return exactly what ``json.dumps`` returns with the
same options (``separators=(",", ":")``; plus ``sort_keys``, ``ensure_ascii=False``,
``allow_nan=False`` for the canonical form), so any text written before and after them is alike.
They only skip what ``json.dumps`` pays on every call given any option: building a new
``JSONEncoder``. An encoder keeps no state between calls (``encode`` makes its own per call), so one
module-wide encoder per form is safe to share across threads.
"""

from __future__ import annotations

import json
from typing import Any

_COMPACT = json.JSONEncoder(separators=(",", ":"))
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def compact(value: Any) -> str:
    """``json.dumps(value, separators=(",", ":"))``: the form of events, entries and payload sizes."""
    return _COMPACT.encode(value)


def canonical(value: Any) -> str:
    """Sorted keys, no spaces, no NaN (``ValueError``): equal data, equal text (cache keys)."""
    return _CANONICAL.encode(value)
