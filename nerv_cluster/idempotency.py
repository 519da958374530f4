"""Idempotent submission (issue 11, part 4): the same idempotency key gives the same run.

Invariant: a key names one run id (:func:`run_id_for_key`, a pure function of the key), and a run id is
created at most once while its log exists (``submit.lua`` refuses an existing log atomically). So two
clients submitting under one key at once, or a client retrying after a lost reply, get one run and the
same id back; nothing is read first, so no race is left between a check and a write. Once the run has
expired (its retention time after it ended), its log is gone and the key starts a new run.

A different definition under a key already used returns the existing run unchanged: the key says "this
request was made", whatever the retrying client rebuilt (a workflow often carries a timestamp or a
generated value), and comparing definitions would turn a harmless retry into an error at the worst
moment. Use a new key for a new request.
"""

from __future__ import annotations

import hashlib

from nerv_cluster import constants
from nerv_cluster.errors import IdempotencyKeyError
from nerv_cluster.ids import slug

#: Characters of the key kept readable in the run id (the rest of the id is its digest).
_READABLE_CHARS = 40
#: Hex digits of the key's SHA-256 in the run id: 96 bits, no two keys meet in practice.
_DIGEST_CHARS = 24


def check_key(key: object) -> str:
    """``key`` if it is a usable idempotency key (a non-empty string of at most
    ``MAX_IDEMPOTENCY_KEY_CHARS`` characters); else :class:`IdempotencyKeyError`."""
    if not isinstance(key, str) or not key:
        raise IdempotencyKeyError(f"an idempotency key must be a non-empty string, got {key!r:.80}")
    if len(key) > constants.MAX_IDEMPOTENCY_KEY_CHARS:
        raise IdempotencyKeyError(
            f"idempotency key of {len(key)} characters; the limit is {constants.MAX_IDEMPOTENCY_KEY_CHARS}"
        )
    return key


def run_id_for_key(key: str) -> str:
    """The run id an idempotency key names: a readable start (the key made id-safe) and the key's digest,
    so keys differing only in characters the id alphabet lacks still name different runs."""
    digest = hashlib.sha256(check_key(key).encode()).hexdigest()[:_DIGEST_CHARS]
    return f"{slug(key, _READABLE_CHARS, 'key')}-{digest}"
