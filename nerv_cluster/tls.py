"""TLS to Redis: the options every connection to nerv's Redis (state and Celery broker) gets.

Two ways to ask for it: a ``rediss://`` URL (one server), or ``NERV_REDIS_TLS=1`` with a
``sentinel://`` URL (the Sentinels and the data nodes). ``NERV_REDIS_TLS_CA_CERTS`` names the CA bundle
for both (empty: the system's); a ``rediss://`` URL may also carry ``?ssl_ca_certs=<path>``, which wins.

Invariant: the server's certificate is always verified, the Celery broker's included. kombu 5.7 falls
back to ``CERT_NONE`` (no verification) for a ``rediss://`` broker given no SSL options, so
:func:`broker_ssl` always gives it ``CERT_REQUIRED``.

A certificate that fails verification is a misconfiguration, not an outage: with
:func:`is_certificate_error`, :class:`CertificateAwareRetry` (the client's and the Sentinel lookups'
retries) gives up on it at once, with the TLS error's text, instead of retrying it ``redis_retries`` times.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.backoff import ExponentialWithJitterBackoff
from redis.client import DEFAULT_RETRY_BASE, DEFAULT_RETRY_CAP, DEFAULT_RETRY_COUNT
from redis.retry import Retry

if TYPE_CHECKING:
    from nerv_cluster.settings import Settings

#: The URL scheme of Redis over TLS (one server).
SCHEME = "rediss://"


def wanted(settings: Settings, url: str) -> bool:
    """True when connections to ``url`` speak TLS."""
    return url.startswith(SCHEME) or (url.startswith("sentinel://") and settings.redis_tls)


def client_options(settings: Settings, url: str) -> dict[str, Any]:
    """redis-py connection options for TLS to ``url`` (empty without TLS). For ``rediss://`` redis-py
    already turns TLS on from the scheme; only the CA bundle is added."""
    if not wanted(settings, url):
        return {}
    opts: dict[str, Any] = {} if url.startswith(SCHEME) else {"ssl": True}
    opts["ssl_cert_reqs"] = "required"
    if settings.redis_tls_ca_certs:
        opts["ssl_ca_certs"] = settings.redis_tls_ca_certs
    return opts


def broker_ssl(settings: Settings, url: str) -> dict[str, Any] | None:
    """Celery's ``broker_use_ssl`` for a broker at ``url`` (None without TLS): verification required."""
    if not wanted(settings, url):
        return None
    opts: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.redis_tls_ca_certs:
        opts["ssl_ca_certs"] = settings.redis_tls_ca_certs
    return opts


def is_certificate_error(error: BaseException) -> bool:
    """True if ``error`` (a redis-py error) comes from a failed TLS handshake check (an untrusted or
    mismatched certificate): retrying cannot help. redis-py raises its ``ConnectionError`` inside the
    handler of the ``ssl`` error, so the cause is in the exception's context chain (nerv's Sentinel
    client chains its ``MasterNotFoundError`` to it when every Sentinel failed that way)."""
    seen: BaseException | None = error
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class CertificateAwareRetry(Retry):
    """redis-py's retry, except that a failed certificate check is raised at once: retrying an untrusted
    certificate cannot help, and the caller should see the TLS error, not a long wait."""

    def call_with_retry(
        self,
        do: Callable[[], Any],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        """Run ``do`` as redis-py's :class:`Retry` would, but never retry a certificate error."""

        def retryable(error: Exception) -> bool:
            return not is_certificate_error(error) and (is_retryable is None or is_retryable(error))

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def sentinel_retry() -> CertificateAwareRetry:
    """The retry of a Sentinel lookup: redis-py's default one (its count, jittered backoff up to its
    cap), except that an untrusted Sentinel certificate is not retried."""
    return CertificateAwareRetry(
        ExponentialWithJitterBackoff(base=DEFAULT_RETRY_BASE, cap=DEFAULT_RETRY_CAP), DEFAULT_RETRY_COUNT
    )
