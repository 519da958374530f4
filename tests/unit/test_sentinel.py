"""sentinel:// URLs (issue 17): parsing, the Settings fields, the Celery broker's kombu form."""

from __future__ import annotations

from ssl import CERT_REQUIRED

import pytest

from nerv_cluster import Settings
from nerv_cluster.celery_app import create_celery
from nerv_cluster.errors import ConfigurationError
from nerv_cluster.replication import Replication
from nerv_cluster.sentinel import SentinelURL, broker, is_sentinel
from nerv_cluster.tls import CertificateAwareRetry


def test_parse_hosts_service_db_and_password() -> None:
    url = SentinelURL.parse("sentinel://:s%40cret@h1:26379,h2:26380,h3/mymaster/2")
    assert url.sentinels == (("h1", 26379), ("h2", 26380), ("h3", 26379))
    assert (url.service, url.db, url.password, url.username) == ("mymaster", 2, "s@cret", None)
    assert SentinelURL.parse("sentinel://h1:26379/mymaster").db == 0
    assert is_sentinel("sentinel://h/m") and not is_sentinel("redis://h")


@pytest.mark.parametrize(
    "url",
    [
        "sentinel://h1:26379",
        "sentinel:///mymaster/0",
        "sentinel://h1:x/m/0",
        "sentinel://h/m/zero",
        "sentinel://h/m/0/1",
    ],
)
def test_malformed_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        Settings.from_env({}, redis_url=url)


def test_settings_read_the_ha_fields() -> None:
    s = Settings.from_env(
        {
            "NERV_REDIS_URL": "sentinel://h1:26379,h2:26379/mymaster/0",
            "NERV_REDIS_PASSWORD": "pw",
            "NERV_REDIS_SENTINEL_PASSWORD": "spw",
            "NERV_REDIS_TLS": "1",
            "NERV_REDIS_MIN_REPLICAS": "1",
            "NERV_REDIS_REPLICA_TIMEOUT_MS": "250",
        }
    )
    assert (s.redis_password, s.redis_sentinel_password, s.redis_tls) == ("pw", "spw", True)
    assert Replication.of(s) == Replication(1, 250)
    assert Replication.of(Settings.from_env({})).on is False  # default: no WAIT, today's behaviour
    with pytest.raises(ConfigurationError):
        Settings.from_env({}, redis_min_replicas=-1)


def test_the_broker_speaks_kombus_sentinel_form() -> None:
    s = Settings.from_env({}, redis_url="sentinel://h1:26379,h2:26380/mymaster/3", redis_password="pw")
    url, options, ssl = broker(s, s.broker)
    assert url == "sentinel://:pw@h1:26379/3;sentinel://:pw@h2:26380/3"
    assert options == {"master_name": "mymaster"} and ssl is None
    tls = s.with_(redis_tls=True, redis_sentinel_password="spw", redis_tls_ca_certs="/ca.pem")
    _, options, ssl = broker(tls, tls.broker)
    # An untrusted Sentinel certificate is not retried (nerv_cluster.tls).
    assert isinstance(options["sentinel_kwargs"].pop("retry"), CertificateAwareRetry)
    assert options["sentinel_kwargs"] == {
        "password": "spw",
        "ssl": True,
        "ssl_cert_reqs": "required",
        "ssl_ca_certs": "/ca.pem",
    }
    assert ssl == {"ssl_cert_reqs": CERT_REQUIRED, "ssl_ca_certs": "/ca.pem"}
    app = create_celery(s)
    assert app.conf.broker_transport == "nerv_cluster.transport:SentinelTransport"
    assert app.conf.broker_transport_options["master_name"] == "mymaster"
    assert app.conf.broker_transport_options["visibility_timeout"] == s.visibility_timeout
