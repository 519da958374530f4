"""Who a process is to Redis: the ACL user (``nerv_cluster.acl``) its connections authenticate as.

Two ways to say it: in the URL (``redis://user:password@host/0``, ``rediss://...``,
``sentinel://user:password@host:port/<service>``), or, for a URL that carries none, with
``NERV_REDIS_USERNAME`` and ``NERV_REDIS_PASSWORD`` (meant for Secrets: a password never has to be
URL-quoted into a URL in a manifest). Invariant: the state connections (``client.connect``) and the
Celery broker (``celery_app``) of one process authenticate as the same user, so one role's ACL user
covers everything the process does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from nerv_cluster.settings import Settings


def url_has_credentials(url: str) -> bool:
    """True when ``url`` names a user or a password itself (``user:pw@``, ``:pw@``, ``user@``)."""
    netloc = urlsplit(url).netloc
    return "@" in netloc


def with_credentials(url: str, settings: Settings) -> str:
    """``url`` with ``settings.redis_username`` / ``redis_password`` put in, unless it names its own
    (a ``redis://`` or ``rediss://`` URL; ``sentinel://`` and ``unix://`` URLs are returned as they are:
    :mod:`nerv_cluster.sentinel` and redis-py take the settings' credentials there themselves)."""
    if not url.startswith(("redis://", "rediss://")) or url_has_credentials(url):
        return url
    if not settings.redis_username and not settings.redis_password:
        return url
    parts = urlsplit(url)
    user = quote(settings.redis_username, safe="")
    password = quote(settings.redis_password, safe="")
    auth = f"{user}:{password}@" if password else f"{user}@"
    return urlunsplit(parts._replace(netloc=auth + parts.netloc))
