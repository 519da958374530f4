"""TLS options (nerv_cluster.tls): what each URL form asks of redis-py and of the Celery broker, and
that a failed certificate check is not retried."""

from __future__ import annotations

import ssl

import pytest
import redis
from redis.backoff import NoBackoff
from redis.sentinel import MasterNotFoundError

from nerv_cluster import Settings
from nerv_cluster.celery_app import create_celery
from nerv_cluster.errors import ConfigurationError
from nerv_cluster.tls import CertificateAwareRetry, broker_ssl, client_options, is_certificate_error


def test_plain_urls_ask_for_nothing() -> None:
    s = Settings(redis_url="redis://127.0.0.1:6379/0", redis_tls_ca_certs="/ca.pem")
    assert client_options(s, s.redis_url) == {} and broker_ssl(s, s.redis_url) is None
    sentinel = Settings(redis_url="sentinel://h:26379/svc/0")  # NERV_REDIS_TLS not set
    assert client_options(sentinel, sentinel.redis_url) == {}


def test_rediss_and_sentinel_tls_verify_with_the_ca() -> None:
    s = Settings(redis_url="rediss://127.0.0.1:6380/0", redis_tls_ca_certs="/ca.pem")
    assert client_options(s, s.redis_url) == {"ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.pem"}
    assert broker_ssl(s, s.redis_url) == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem"}
    t = Settings(redis_url="sentinel://h:26379/svc/0", redis_tls=True)
    assert client_options(t, t.redis_url) == {"ssl": True, "ssl_cert_reqs": "required"}


def test_a_rediss_broker_verifies_the_certificate() -> None:
    """kombu alone would give a rediss:// broker named by transport class no TLS at all (and CERT_NONE
    by scheme); nerv's broker always verifies, with the CA of the setting or of the URL."""
    conn = create_celery(Settings(redis_url="rediss://127.0.0.1:6380/0")).connection_for_write()
    assert conn.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    query = "rediss://127.0.0.1:6380/0?ssl_ca_certs=/url-ca.pem"
    conn = create_celery(Settings(redis_url=query, redis_tls_ca_certs="/ca.pem")).connection_for_write()
    assert conn.ssl == {"ssl_ca_certs": "/url-ca.pem"}  # redis-py's SSLConnection requires a valid cert
    assert not create_celery(Settings(redis_url="redis://127.0.0.1:6379/0")).connection_for_write().ssl


def test_certificate_errors_are_recognised() -> None:
    chained = redis.ConnectionError("Error connecting")
    chained.__context__ = ssl.SSLCertVerificationError(1, "verify failed")
    assert is_certificate_error(chained)
    # nerv's Sentinel client chains "no master" to the TLS error when every Sentinel failed with one.
    gathered = MasterNotFoundError("No master found for 'svc' (h:26379: ... certificate verify failed)")
    gathered.__cause__ = chained
    assert is_certificate_error(gathered)
    assert not is_certificate_error(
        MasterNotFoundError("No master found for 'svc' (... CERTIFICATE_VERIFY_FAILED)")
    )
    assert not is_certificate_error(redis.ConnectionError("Connection refused"))


@pytest.mark.parametrize(("error", "calls"), [("cert", 1), ("refused", 4)])
def test_the_client_retry_gives_up_on_a_certificate_error_at_once(error: str, calls: int) -> None:
    made: list[int] = []

    def do() -> None:
        made.append(1)
        if error == "cert":
            exc = redis.ConnectionError("Error 1 connecting")
            exc.__context__ = ssl.SSLCertVerificationError(1, "verify failed")
            raise exc
        raise redis.ConnectionError("Connection refused")

    with pytest.raises(redis.ConnectionError):
        CertificateAwareRetry(NoBackoff(), 3).call_with_retry(do, lambda _e: None)
    assert len(made) == calls


def test_tls_asked_with_a_plain_url_is_refused() -> None:
    """NERV_REDIS_TLS=1 with redis:// would otherwise speak in clear without a word."""
    with pytest.raises(ConfigurationError, match="rediss://"):
        Settings(redis_url="redis://127.0.0.1:6379/0", redis_tls=True)
    assert Settings(redis_url="rediss://127.0.0.1:6380/0", redis_tls=True).redis_tls
