"""Redis behind Sentinel: ``NERV_REDIS_URL=sentinel://host1:26379,host2:26379/mymaster/0``.

Invariant: every process that speaks to nerv's Redis through a ``sentinel://`` URL asks the Sentinels
where the primary is on each new connection (redis-py's ``Sentinel.master_for``), so after a failover
the next command, or redis-py's retry of the failed one, lands on the new primary without a restart;
a connection still open to a demoted primary is dropped on its first ``READONLY`` reply. The Celery
broker (workers, the scheduler's sends, Flower) uses kombu's own Sentinel transport with the same
Sentinels and service name.

URL form: ``sentinel://[[user]:password@]host:port[,host:port...]/<service name>[/<db>]``; the user and
password in the URL (or ``NERV_REDIS_USERNAME`` / ``NERV_REDIS_PASSWORD``) are the data nodes' (the
process's ACL user, ``nerv_cluster.acl``); the Sentinels' own password is
``NERV_REDIS_SENTINEL_PASSWORD``; ``NERV_REDIS_TLS=1`` speaks TLS to both (with
``NERV_REDIS_TLS_CA_CERTS`` as the CA bundle; the options are ``nerv_cluster.tls``'s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import redis
from redis.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from nerv_cluster import tls as tls_options
from nerv_cluster.errors import ConfigurationError

if TYPE_CHECKING:
    from nerv_cluster.settings import Settings

#: The URL scheme naming Redis behind Sentinel.
SCHEME = "sentinel://"
#: Sentinel's default port, for hosts given without one.
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A parsed ``sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        """Parse ``url``; :class:`ConfigurationError` says what is wrong with a malformed one."""
        if not url.startswith(SCHEME):
            raise ConfigurationError(f"not a sentinel:// URL: {url!r}")
        rest = url[len(SCHEME) :]
        netloc, _, path = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, pw = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(pw) if colon else None
        sentinels: list[tuple[str, int]] = []
        for part in hosts.split(","):
            part = part.strip()
            if not part:
                continue
            host, colon, port = part.rpartition(":") if part.count(":") == 1 else (part, "", "")
            try:
                sentinels.append((host, int(port) if colon else DEFAULT_SENTINEL_PORT))
            except ValueError:
                raise ConfigurationError(f"bad sentinel address {part!r} in {url!r}") from None
        parts = [p for p in path.split("/") if p]
        if not sentinels or not parts or len(parts) > 2:
            raise ConfigurationError(
                f"a sentinel URL is sentinel://host:port[,host:port...]/<service>[/<db>], got {url!r}"
            )
        try:
            db = int(parts[1]) if len(parts) == 2 else 0
        except ValueError:
            raise ConfigurationError(f"bad database number {parts[1]!r} in {url!r}") from None
        return cls(tuple(sentinels), parts[0], db, username, password)


class _AsksWhereThePrimaryIs:
    """Ask the Sentinels for the primary's address before every socket connect.

    redis-py 8.1's ``SentinelManagedConnection`` asks only in ``connect()``; a command retried after a
    connection error reconnects through ``connect_check_health()``, to the address it had, so every
    retry during a failover goes to the dead primary until the retries run out (~35 s here). Asking
    on each socket connect sends the retry to the new primary as soon as the Sentinels name it.
    """

    connection_pool: Any
    host: str
    port: int

    def _connect(self) -> Any:
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super()._connect()  # type: ignore[misc]


class PrimaryConnection(_AsksWhereThePrimaryIs, SentinelManagedConnection):
    """A connection to the primary the Sentinels name, found again on every reconnect."""


class PrimarySSLConnection(_AsksWhereThePrimaryIs, SentinelManagedSSLConnection):
    """:class:`PrimaryConnection` over TLS."""


class _Sentinels(Sentinel):
    """redis-py's Sentinel client, with each Sentinel's error kept when none names a primary.

    redis-py 8.1 folds them into the text of one ``MasterNotFoundError`` by ``repr``, which keeps only
    the error's type ("network:ConnectionError"): an untrusted Sentinel certificate read like a Sentinel
    that is down, and was retried as one. Here the text says each Sentinel's error, and when every
    Sentinel failed its certificate check the error is chained to that ``ssl`` error, so the client's
    retry (``nerv_cluster.tls.CertificateAwareRetry``) raises it at once. The loop is upstream's.
    """

    def discover_master(self, service_name: str) -> tuple[str, int]:
        errors: list[tuple[str, Exception]] = []
        for i, node in enumerate(self.sentinels):
            try:
                masters: dict[str, Any] = node.sentinel_masters()  # type: ignore[assignment]
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                where = node.connection_pool.connection_kwargs
                errors.append((f"{where.get('host')}:{where.get('port')}", exc))
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                self.sentinels[0], self.sentinels[i] = node, self.sentinels[0]
                ip = self._force_master_ip if self._force_master_ip is not None else state["ip"]
                return ip, state["port"]
        said = "; ".join(f"{where}: {exc}" for where, exc in errors)
        error = MasterNotFoundError(f"No master found for {service_name!r}" + (f" ({said})" if said else ""))
        if errors and all(tls_options.is_certificate_error(exc) for _, exc in errors):
            raise error from errors[0][1]
        raise error


def is_sentinel(url: str) -> bool:
    """True for a ``sentinel://`` URL."""
    return url.startswith(SCHEME)


def master_client(settings: Settings, **connection: Any) -> redis.Redis:
    """A client of the current primary named by ``settings.redis_url`` (a ``sentinel://`` URL);
    ``connection`` holds the redis-py connection options (decoding, timeouts, retries)."""
    url = SentinelURL.parse(settings.redis_url)
    tls = tls_options.client_options(settings, settings.redis_url)
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": connection.get("socket_connect_timeout", 5),
        "socket_connect_timeout": connection.get("socket_connect_timeout", 5),
        **tls,
    }
    if settings.redis_sentinel_password:
        sentinel_kwargs["password"] = settings.redis_sentinel_password
    if tls:
        sentinel_kwargs["retry"] = tls_options.sentinel_retry()
    manager = _Sentinels(list(url.sentinels), sentinel_kwargs=sentinel_kwargs)
    return manager.master_for(
        url.service,
        redis_class=redis.Redis,
        connection_class=PrimarySSLConnection if tls else PrimaryConnection,
        db=url.db,
        username=url.username or settings.redis_username or None,
        password=url.password or settings.redis_password or None,
        **tls,
        **connection,
    )


def broker(settings: Settings, url: str) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """kombu's form of a ``sentinel://`` broker URL: the URL (one ``sentinel://`` per Sentinel, ``;``
    apart, the data nodes' password and db on the first), the transport options (service name,
    Sentinel password) and the ``broker_use_ssl`` options (None without TLS)."""
    parsed = SentinelURL.parse(url)
    # The process's ACL user too (kombu hands the first URL's user and password to the data nodes).
    user = quote(parsed.username or settings.redis_username or "", safe="")
    password = quote(parsed.password or settings.redis_password or "", safe="")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    urls = [f"sentinel://{auth}{host}:{port}/{parsed.db}" for host, port in parsed.sentinels]
    options: dict[str, Any] = {"master_name": parsed.service}
    sentinel_kwargs: dict[str, Any] = {}
    if settings.redis_sentinel_password:
        sentinel_kwargs["password"] = settings.redis_sentinel_password
    # The Sentinels speak TLS too: kombu hands ``sentinel_kwargs`` to redis-py's Sentinel as is (so does
    # Flower, which also sets a ``retry`` there); an untrusted Sentinel certificate is not retried.
    tls = tls_options.client_options(settings, url)
    if tls:
        sentinel_kwargs.update(tls, retry=tls_options.sentinel_retry())
    if sentinel_kwargs:
        options["sentinel_kwargs"] = sentinel_kwargs
    return ";".join(urls), options, tls_options.broker_ssl(settings, url)
