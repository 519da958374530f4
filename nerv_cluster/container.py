"""The Dependency Injector container that wires every part from the settings.

Processes build what they use from one container; tests override providers (``container.settings``,
``container.redis``...). Forked worker processes call ``reset_singletons()`` so no connection is shared
across a fork.
"""

from __future__ import annotations

from typing import Any

from dependency_injector import containers, providers

from nerv_cluster.bus import EventBus
from nerv_cluster.celery_app import create_celery
from nerv_cluster.children import SpawnBounds
from nerv_cluster.client import Client, connect
from nerv_cluster.constants import Keys
from nerv_cluster.eventlog import EventLog
from nerv_cluster.handoff import Handoffs
from nerv_cluster.planner import plan
from nerv_cluster.registry import default_registry
from nerv_cluster.replication import Replication
from nerv_cluster.settings import Settings
from nerv_cluster.state import StateProjector


def _handoffs(settings: Settings, client: Any, keys: Keys) -> Handoffs | None:
    return Handoffs(client, keys, settings.signing_key) if settings.handoff else None


class Container(containers.DeclarativeContainer):
    """Every service of nerv-cluster, built on first use."""

    settings = providers.Singleton(Settings.from_env)
    keys = providers.Singleton(Keys, prefix=settings.provided.prefix)
    redis = providers.Singleton(connect, settings)
    eventlog = providers.Singleton(EventLog, redis, keys, providers.Callable(Replication.of, settings))
    #: None when ``settings.handoff`` is off: then every job travels as a Celery message.
    handoffs: providers.Provider[Any] = providers.Singleton(_handoffs, settings, redis, keys)
    bus = providers.Singleton(EventBus)
    celery = providers.Singleton(create_celery, settings)
    registry = providers.Object(default_registry)
    planner = providers.Object(plan)
    projector = providers.Factory(StateProjector)
    client = providers.Factory(Client, settings=settings, redis_client=redis, bus=bus)

    # The services live in their own packages on top of this library; string paths keep the layering.
    lease: providers.Singleton[Any] = providers.Singleton(
        "scheduler.lease.Lease", eventlog, ttl_ms=settings.provided.lease_ttl_ms
    )
    dispatcher: providers.Singleton[Any] = providers.Singleton("scheduler.dispatch.Dispatcher", celery)
    #: The scheduler measures deadlines on Redis's clock, which also dates the logged events.
    clock: providers.Singleton[Any] = providers.Singleton("scheduler.clock.RedisClock", redis)
    scheduler: providers.Singleton[Any] = providers.Singleton(
        "scheduler.service.SchedulerService",
        settings=settings,
        log=eventlog,
        lease=lease,
        dispatcher=dispatcher,
        clock=clock,
        handoffs=handoffs,
    )
    worker_id: providers.Singleton[Any] = providers.Singleton("worker.runner.new_worker_id")
    #: The attempts this worker process holds (per process: reset after a fork like everything here).
    held: providers.Singleton[Any] = providers.Singleton("worker.held.HeldAttempts")
    runner: providers.Singleton[Any] = providers.Singleton(
        "worker.runner.TaskRunner",
        log=eventlog,
        registry=registry,
        worker_id=worker_id,
        max_result_bytes=settings.provided.max_result_bytes,
        max_redeliveries=settings.provided.max_redeliveries,
        handoffs=handoffs,
        held=held,
        spawn_bounds=providers.Callable(SpawnBounds.of, settings),
        signing=settings.provided.signing_key,
    )
    heartbeat: providers.Singleton[Any] = providers.Singleton(
        "worker.heartbeat.Heartbeat",
        redis,
        key=providers.Callable(lambda k, w: k.heartbeat(w), keys, worker_id),
        held=held.provided.snapshot,
        workers_key=keys.provided.workers,
        worker_id=worker_id,
    )


def container_for(settings: Settings) -> Container:
    """A container whose settings are ``settings`` (instead of the environment)."""
    c = Container()
    c.settings.override(providers.Object(settings))
    return c
