"""The Celery app both sides share: the scheduler sends jobs with it, workers consume with it.

JSON only (pickle is refused), no result backend (results travel in the event log), late acks so a
task whose worker dies is redelivered, and task events on so Flower can watch.

Every key and channel kombu uses (the queues, ``_kombu.binding.*``, ``unacked``, ``unacked_index``,
``unacked_mutex``, the pidbox and event channels) is inside the namespace: kombu's ``global_keyprefix``
is ``<namespace>:celery:`` (``Keys.celery``), so two namespaces on one Redis have their own queues and
their ACL users (``nerv_cluster.acl``) confine each to its own. Flower reads the same option.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from nerv_cluster import constants, redisauth, sentinel, tls
from nerv_cluster.settings import Settings


def create_celery(settings: Settings, main: str = "nerv") -> Celery:
    """A configured Celery app (no tasks registered; workers add theirs)."""
    broker_url = redisauth.with_credentials(settings.broker, settings)
    transport_options: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout,
        "global_keyprefix": settings.keys().celery,
        # Fanout channels (pidbox, events) without kombu's default "/<db>." in their names: the ACL
        # patterns Redis compares PSUBSCRIBE patterns with literally (nerv_cluster.acl) then do not
        # depend on the database number; the namespace, not the database, keeps clusters apart.
        "fanout_prefix": constants.CELERY_FANOUT_PREFIX,
    }
    use_ssl: dict[str, Any] | None = None
    if sentinel.is_sentinel(broker_url):
        # kombu's own form: one sentinel:// URL per Sentinel, the service name as a transport option.
        broker_url, more, use_ssl = sentinel.broker(settings, broker_url)
        transport_options.update(more)
    app = Celery(main, broker=broker_url, set_as_current=False)
    # A watcher (Flower: NERV_BROKER_RESTORE=0) leaves restoring lost consumers' messages to the workers.
    watcher = "" if settings.broker_restore else "Watcher"
    if settings.broker.startswith(("redis://", "rediss://")):
        # kombu's Redis transport plus a fix for surviving a Redis restart (see nerv_cluster.transport).
        app.conf.broker_transport = f"nerv_cluster.transport:{watcher}Transport"
        # Named by class, the transport no longer hears "rediss" from the scheme: without SSL options
        # kombu would speak in clear to the TLS port (nerv_cluster.tls). A ?ssl_...= in the URL wins.
        use_ssl = tls.broker_ssl(settings, settings.broker)
    elif sentinel.is_sentinel(settings.broker):
        app.conf.broker_transport = f"nerv_cluster.transport:Sentinel{watcher}Transport"
    if use_ssl is not None:
        app.conf.broker_use_ssl = use_ssl
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=settings.prefetch_multiplier,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_queues=[Queue(q, routing_key=q) for q in constants.QUEUES],
        task_default_queue=constants.DEFAULT_QUEUE,
        task_create_missing_queues=False,
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
    )
    return app
