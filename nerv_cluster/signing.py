"""Signed jobs: the scheduler signs every job message and hand-off, workers run only what it signed.

A job travels as one string: the hex HMAC-SHA256 of its JSON body under the cluster's signing key, then
the body itself (``<64 hex><json>``). The signature covers every byte a worker acts on (run, task,
attempt, function name, arguments, options, the attempt's claim token), so a message altered in a queue,
or made up by a process without the key, is refused before anything of it runs or is recorded.

Invariant: one HMAC per job on each side, over the bytes already at hand (the scheduler signs the JSON it
sends, the worker checks the string it received before parsing it), and no Redis round trip per job:
the key is read once per process.

The key is ``NERV_SIGNING_KEY``. Without it a cluster uses a random key created once in Redis (``SET
NX``, so every process of the cluster reads the same one) and warns: that suits a laptop, not production,
since any process that can read Redis can then sign jobs. See README.md#security.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
from typing import Any

from nerv_cluster.constants import Keys
from nerv_cluster.errors import JobSignatureError

log = logging.getLogger("nerv.signing")

#: Length of the hex signature in front of a signed body.
SIGNATURE_CHARS = 64
#: Bytes of a generated per-cluster key.
_GENERATED_KEY_BYTES = 32


class Signer:
    """Signs and opens job messages under one key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("a signing key must not be empty")
        self._key = key

    def seal(self, body: str) -> str:
        """``body`` with its signature in front."""
        return hmac.digest(self._key, body.encode(), "sha256").hex() + body

    def open(self, wire: object) -> str:
        """The body of a sealed message; :class:`JobSignatureError` when it is not a string, carries
        no signature or one that does not match its body."""
        if not isinstance(wire, str) or len(wire) <= SIGNATURE_CHARS:
            raise JobSignatureError("the job message is not signed")
        body, signature = wire[SIGNATURE_CHARS:], wire[:SIGNATURE_CHARS]
        # A forger's text may hold what neither step takes: a lone surrogate (JSON's "\ud800" decodes
        # to one) does not encode, and compare_digest raises TypeError on non-ASCII text. Both are a
        # forgery, to be refused as unsigned, not taken for a signed message that is no job.
        try:
            data = body.encode()
        except UnicodeEncodeError:
            raise JobSignatureError("the job message's signature does not match its contents") from None
        want = hmac.digest(self._key, data, "sha256").hex()
        if not signature.isascii() or not hmac.compare_digest(want, signature):
            raise JobSignatureError("the job message's signature does not match its contents")
        return body


def claimed_id(wire: object) -> str:
    """The job id a refused message says it is, for a log line (never its arguments), or '?'."""
    try:
        if isinstance(wire, dict):  # an unsigned job body, as an old scheduler sent them
            body = wire
        elif isinstance(wire, str):
            body = json.loads(wire if wire[:1] == "{" else wire[SIGNATURE_CHARS:])
        else:
            return f"<{type(wire).__name__}>"
        return f"{body['r']}:{body['k']}:{int(body['a'])}"[:200]
    except Exception:
        return "?"


def set_once(client: Any, key: str, fresh: str) -> bytes:
    """The value of ``key``, set to ``fresh`` first if it had none (SET NX then GET in one MULTI:
    ``SET NX GET`` needs Redis 7, and a server of the cluster may be older)."""
    pipe = client.pipeline(transaction=True)
    pipe.set(key, fresh, nx=True)
    pipe.get(key)
    value = pipe.execute()[1]
    return value.encode() if isinstance(value, str) else bytes(value)


def signing_key(configured: str, client: Any, keys: Keys) -> bytes:
    """The cluster's signing key: ``configured`` (``NERV_SIGNING_KEY``) when set, else the per-cluster
    key in Redis, created by whoever asks first (one round trip, when a scheduler's term begins)."""
    if configured:
        return configured.encode()
    key = set_once(client, keys.signing_key, secrets.token_hex(_GENERATED_KEY_BYTES))
    _warn_generated(keys)
    return key


def verifying_key(configured: str, client: Any, keys: Keys) -> bytes | None:
    """The key a worker checks jobs with: ``configured`` when set, else the per-cluster key in Redis,
    read only (a worker's ACL user may not write it, docs: README "Security"); None while no scheduler
    has made it yet, when no job it signed can exist either."""
    if configured:
        return configured.encode()
    value = client.get(keys.signing_key)
    if value is None:
        return None
    _warn_generated(keys)
    return value.encode() if isinstance(value, str) else bytes(value)


def _warn_generated(keys: Keys) -> None:
    log.warning(
        "NERV_SIGNING_KEY is not set: jobs are signed with a per-cluster key kept in Redis (%s); any "
        "process that can read Redis can sign jobs. Set NERV_SIGNING_KEY (a long random secret, the "
        "same for the scheduler and every worker) in production.",
        keys.signing_key,
    )


class WorkerSigner:
    """A worker process's Signer, read once it exists (see :func:`worker_signer`): the runner and the
    hand-off wait share this instead of each caching its own."""

    __slots__ = ("_client", "_configured", "_keys", "_signer")

    def __init__(self, configured: str, client: Any, keys: Keys) -> None:
        self._configured, self._client, self._keys = configured, client, keys
        self._signer: Signer | None = None

    def get(self) -> Signer:
        """The Signer to check a job with now."""
        if self._signer is not None:
            return self._signer
        signer, keep = worker_signer(self._configured, self._client, self._keys)
        if keep:
            self._signer = signer
        return signer


def worker_signer(configured: str, client: Any, keys: Keys) -> tuple[Signer, bool]:
    """A worker's Signer and whether to keep it: before any scheduler made the cluster's key, one
    with a random key of its own, which no job verifies against (no job can have been signed yet),
    not to be kept: the next job reads the key again."""
    key = verifying_key(configured, client, keys)
    if key is None:
        return Signer(secrets.token_bytes(_GENERATED_KEY_BYTES)), False
    return Signer(key), True
