"""The OpenTelemetry SDK end of the scheduler's tracing (see :mod:`scheduler.tracing`): the records a
:class:`~scheduler.tracing.SpanBuilder` makes become SDK spans with the ids and times it derived.

Through the SDK's own ``Tracer.start_span`` (so its span limits, samplers' attributes, resource and
span processors apply as configured by the standard ``OTEL_*`` variables), with the ids planned by
:class:`PlannedIds`, the provider's id generator. Imported only when tracing is on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from opentelemetry import context, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

from nerv_cluster import constants
from nerv_cluster.errors import ConfigurationError
from nerv_cluster.model import Event
from nerv_cluster.state import State
from scheduler.tracing import SpanBuilder, SpanRecord

log = logging.getLogger("nerv.scheduler")


class PlannedIds(IdGenerator):
    """An id generator that hands out the ids planned for the next span (the SDK asks its provider's
    generator for a span's ids; ours are derived from the log, see
    :func:`scheduler.tracing.attempt_span_id`). Used from the scheduler loop's thread only; with nothing
    planned it falls back to random ids."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self._trace_id: int | None = None
        self._span_id: int | None = None

    def plan(self, trace_id: int, span_id: int) -> None:
        """The ids of the next span started."""
        self._trace_id, self._span_id = trace_id, span_id

    def generate_trace_id(self) -> int:
        """The planned trace id (asked for a root span only), once."""
        out, self._trace_id = self._trace_id, None
        return out if out is not None else self._random.generate_trace_id()

    def generate_span_id(self) -> int:
        """The planned span id, once."""
        out, self._span_id = self._span_id, None
        return out if out is not None else self._random.generate_span_id()

    def is_trace_id_random(self) -> bool:
        """Our trace ids are hashes, not random (W3C trace-context level 2 flag)."""
        return False


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


class Tracing:
    """The scheduler's collaborator: a :class:`SpanBuilder` whose records go to an OpenTelemetry
    ``TracerProvider`` (its span processors export them). Errors are logged, never raised: tracing
    must not stop the loop."""

    def __init__(self, provider: TracerProvider) -> None:
        ids = provider.id_generator
        if not isinstance(ids, PlannedIds):
            raise ConfigurationError("Tracing needs a TracerProvider made by scheduler.tracing.provider()")
        self.provider = provider
        self._ids = ids
        self._tracer = provider.get_tracer("nerv_cluster.scheduler")
        self.builder = SpanBuilder()

    def observe(self, events: Iterable[Event], state: State) -> None:
        """Emit the spans these feed events end."""
        try:
            for rec in self.builder.observe(events, state):
                self.emit(rec)
        except Exception:
            log.exception("tracing: could not build or emit spans (tracing goes on)")

    def rebuild(self, state: State) -> None:
        """A new leader's open runs and attempts (see :meth:`SpanBuilder.rebuild`)."""
        try:
            self.builder.rebuild(state)
        except Exception:
            log.exception("tracing: could not rebuild the open spans")
            self.builder.clear()

    def clear(self) -> None:
        """Forget the open spans (stepping down)."""
        self.builder.clear()

    def forget(self, run_ids: Iterable[str]) -> None:
        """Closed runs: see :meth:`SpanBuilder.forget`."""
        self.builder.forget(run_ids)

    def emit(self, rec: SpanRecord) -> None:
        """Hand one finished span to the provider, with its own ids and times."""
        flags = trace.TraceFlags(trace.TraceFlags.SAMPLED)

        def ref(span_id: int) -> trace.SpanContext:
            return trace.SpanContext(rec.trace_id, span_id, is_remote=True, trace_flags=flags)

        ctx = context.Context()
        if rec.parent_id is not None:
            ctx = trace.set_span_in_context(trace.NonRecordingSpan(ref(rec.parent_id)), ctx)
        self._ids.plan(rec.trace_id, rec.span_id)
        span = self._tracer.start_span(
            rec.name,
            context=ctx,
            attributes=rec.attributes,
            links=[trace.Link(ref(sid)) for sid in rec.links],
            start_time=_ns(rec.start),
        )
        if rec.ok is True:
            span.set_status(trace.Status(trace.StatusCode.OK))
        elif rec.ok is False:
            span.set_status(trace.Status(trace.StatusCode.ERROR, rec.error or None))
        span.end(end_time=_ns(rec.end))

    def shutdown(self) -> None:
        """Export what is buffered and stop the exporters."""
        try:
            self.provider.shutdown()
        except Exception:
            log.exception("tracing: shutdown failed")


def provider(
    exporter: SpanExporter, *, batch: bool = True, service_name: str | None = None
) -> TracerProvider:
    """A ``TracerProvider`` for :class:`Tracing` that sends its spans to ``exporter`` (through a batch
    processor, or with ``batch=False`` one span at a time: the tests' in-memory exporter)."""
    name = service_name or os.environ.get("OTEL_SERVICE_NAME") or constants.OTEL_SERVICE_NAME
    out = TracerProvider(resource=Resource.create({SERVICE_NAME: name}), id_generator=PlannedIds())
    out.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    return out


__all__ = ["PlannedIds", "Tracing", "provider"]
