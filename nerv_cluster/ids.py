"""Run ids and task ids: one alphabet and length for both, checked wherever an id enters.

Ids go into Redis keys (inside the ``{run}`` hash tag), job ids (``run:task:attempt``, split on ':')
and log lines. Invariant: every id that reaches a key, a job id or a log line matches
``constants.ID_PATTERN`` (the client and ``Workflow.add`` refuse others; the scheduler fails a run
written into the log with others), and every id nerv makes up itself (:func:`slug`) does too.
"""

from __future__ import annotations

import re

from nerv_cluster import constants
from nerv_cluster.errors import InvalidIdError

_ID_RE = re.compile(constants.ID_PATTERN)
_OTHER = re.compile(r"[^A-Za-z0-9_.-]+")


def is_valid_id(value: object) -> bool:
    """True when ``value`` is a string in the id alphabet, of at most ``MAX_ID_LENGTH`` characters."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def check_id(value: object, what: str) -> str:
    """Return ``value`` if it is a valid id; else raise :class:`InvalidIdError` naming it and ``what``
    it is (``"run id"``, ``"task id"``)."""
    if is_valid_id(value):
        return value  # type: ignore[return-value]  # is_valid_id checked it is a str
    raise InvalidIdError(
        f"invalid {what} {value!r:.200}: use at most {constants.MAX_ID_LENGTH} ASCII letters, digits, "
        "'_', '-' or '.', starting with a letter or digit"
    )


def slug(text: str, max_len: int, fallback: str) -> str:
    """``text`` made into the start of a valid id: other characters become '-', what cannot start an
    id is stripped from the front, cut to ``max_len``; ``fallback`` when nothing is left."""
    out = _OTHER.sub("-", text)[:max_len].lstrip("_.-")
    return out or fallback
