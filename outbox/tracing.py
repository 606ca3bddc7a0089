"""OpenTelemetry trace context across the outbox, when OpenTelemetry is installed.

Without an outbox, a task's span is a child of the request that called ``.delay()``. The
outbox puts a table and a relay in between, and the relay publishes from a process that
knows nothing of that request. So the trace context active at enqueue time is stored with
the row (as W3C ``traceparent``/``tracestate`` message headers, in the row's options) and
published with it; in the worker it becomes the parent of the task's span again.

- ``opentelemetry-instrumentation-celery`` users need nothing more: it reads those
  headers in the worker. The relay publishes each message inside its stored context, so
  the instrumentation's publish span joins the request's trace too.
- Without that instrumentation, :func:`trace_tasks` starts a span per outbox task in the
  worker, with the stored context as its parent. Use one or the other, not both.

Without ``opentelemetry-api`` (the ``tracing`` extra installs it), capturing and
publishing are no-ops and :func:`trace_tasks` returns ``None``; building
:class:`TaskSpans` directly says what to install.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

from celery import Task
from celery.signals import task_postrun, task_prerun

from outbox.errors import OutboxError

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError:  # the optional extra is not installed
    otel_context = None  # type: ignore[assignment]
    propagate = None  # type: ignore[assignment]
    trace = None  # type: ignore[assignment]

#: The W3C Trace Context headers the outbox carries.
TRACE_HEADERS = ("traceparent", "tracestate")

__all__ = [
    "TRACE_HEADERS",
    "TaskSpans",
    "current_trace_headers",
    "publishing_context",
    "trace_tasks",
]


def current_trace_headers() -> dict[str, str]:
    """The active trace context as W3C headers; empty without OpenTelemetry or a span."""
    if propagate is None:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {key: value for key, value in carrier.items() if key in TRACE_HEADERS}


def publishing_context(headers: Mapping[str, Any] | None) -> AbstractContextManager[None]:
    """Make the context stored in ``headers`` current while a message is published.

    Messages without a stored context (most, where nobody traces) get a shared do-nothing
    context manager: this runs once per published message.
    """
    if otel_context is None or not headers or "traceparent" not in headers:
        return _NO_CONTEXT
    return _attached(headers)


_NO_CONTEXT = contextlib.nullcontext()


@contextlib.contextmanager
def _attached(headers: Mapping[str, Any]) -> Iterator[None]:
    token = otel_context.attach(propagate.extract(headers))
    try:
        yield
    finally:
        otel_context.detach(token)


class TaskSpans:
    """Worker signal handlers: one span per task that carries a stored trace context."""

    def __init__(self, tracer_provider: Any = None) -> None:
        if trace is None:
            raise OutboxError(
                "task spans need OpenTelemetry: install celery-outbox[tracing] "
                "(opentelemetry-api) and an SDK to export the spans."
            )
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        # task id -> (span, context token); a thread pool runs tasks side by side.
        self._open: dict[str, tuple[Any, object]] = {}
        self._lock = threading.Lock()

    def prerun(self, task_id: str, task: Task, **_: Any) -> None:  # type: ignore[type-arg]
        headers = getattr(task.request, "headers", None) or {}
        carrier = {
            key: value
            for key in TRACE_HEADERS
            if isinstance(value := headers.get(key, getattr(task.request, key, None)), str)
        }
        if "traceparent" not in carrier:
            return
        span = self._tracer.start_span(
            f"run/{task.name}",
            context=propagate.extract(carrier),
            kind=trace.SpanKind.CONSUMER,
            attributes={"celery.task_name": task.name, "messaging.message.id": task_id},
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        with self._lock:
            self._open[task_id] = (span, token)

    def connect(self) -> TaskSpans:
        task_prerun.connect(self.prerun, weak=False)
        task_postrun.connect(self.postrun, weak=False)
        return self

    def disconnect(self) -> None:
        task_prerun.disconnect(self.prerun)
        task_postrun.disconnect(self.postrun)

    def postrun(self, task_id: str, state: str | None = None, **_: Any) -> None:
        with self._lock:
            opened = self._open.pop(task_id, None)
        if opened is None:
            return
        span, token = opened
        span.set_attribute("celery.state", state or "UNKNOWN")
        if state == "FAILURE":
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        otel_context.detach(token)  # type: ignore[arg-type]
        span.end()


def trace_tasks(tracer_provider: Any = None) -> TaskSpans | None:
    """In a worker without ``opentelemetry-instrumentation-celery``: give each task that
    carries a stored trace context a span whose parent is that context.

    Returns the connected handlers, or ``None`` without OpenTelemetry.
    """
    if trace is None:
        return None
    return TaskSpans(tracer_provider).connect()
