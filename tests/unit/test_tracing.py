"""OpenTelemetry: the trace active at enqueue is the parent of the task's span in the worker."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from outbox import OutboxMessage, Relay, TaskOutbox, create_tables
from outbox.tracing import current_trace_headers, trace_tasks
from tests.services import wait_for
from tests.unit.conftest import memory_app, running_worker

RAN = threading.Event()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
def traced_app() -> Celery:
    app = memory_app("traced")

    @app.task(name="unit.traced", shared=False)
    def traced() -> None:
        RAN.set()

    RAN.clear()
    return app


@pytest.fixture
def worker_spans(traced_app: Celery, provider: TracerProvider) -> Iterator[None]:
    spans = trace_tasks(provider)
    assert spans is not None
    try:
        with running_worker(traced_app):
            yield
    finally:
        spans.disconnect()


def test_no_active_span_stores_no_trace_headers(provider: TracerProvider) -> None:
    with provider.get_tracer("test").start_as_current_span("request"):
        assert {"traceparent"} <= set(current_trace_headers())
    assert {} == current_trace_headers()


def test_the_relay_publishes_each_message_inside_its_stored_context(
    traced_app: Celery, provider: TracerProvider, tmp_path: Path
) -> None:
    """What lets opentelemetry-instrumentation-celery's publish span join the request's
    trace: during the publish, the stored context is the current one."""
    from celery.signals import before_task_publish
    from opentelemetry import trace

    engine = create_engine(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    create_tables(engine)
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("request") as request_span, Session(engine) as session:
        TaskOutbox(traced_app).apply_async("unit.traced", session=session)
        session.commit()
    seen: list[int] = []

    def current_trace(**_: Any) -> None:
        seen.append(trace.get_current_span().get_span_context().trace_id)

    before_task_publish.connect(current_trace, weak=False)
    try:
        assert 1 == Relay(engine, traced_app).run_once().published
    finally:
        before_task_publish.disconnect(current_trace)
    assert [request_span.get_span_context().trace_id] == seen
    assert 0 == trace.get_current_span().get_span_context().trace_id, "and detached after"
    engine.dispose()


def test_the_task_span_is_a_child_of_the_request_that_enqueued_it(
    traced_app: Celery,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    worker_spans: None,
    tmp_path: Path,
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    create_tables(engine)
    tracer = provider.get_tracer("test")
    with (
        tracer.start_as_current_span("POST /orders/1/confirm") as request_span,
        Session(engine) as session,
    ):
        result = TaskOutbox(traced_app).apply_async("unit.traced", session=session)
        session.commit()
    with Session(engine) as session:
        stored: dict[str, Any] = session.scalars(select(OutboxMessage.options)).one()
    assert stored["headers"]["traceparent"].split("-")[1] == format(
        request_span.get_span_context().trace_id, "032x"
    ), "the row carries the request's trace"

    # The relay publishes outside any span, as a separate process would.
    assert 1 == Relay(engine, traced_app).run_once().published
    assert RAN.wait(timeout=10)

    def task_span() -> Any:
        return next((s for s in exporter.get_finished_spans() if s.name == "run/unit.traced"), None)

    span = wait_for(task_span, timeout=10)
    assert span.context.trace_id == request_span.get_span_context().trace_id
    assert span.parent is not None
    assert span.parent.span_id == request_span.get_span_context().span_id
    assert result.id == span.attributes["messaging.message.id"]
    assert "SUCCESS" == span.attributes["celery.state"]
    engine.dispose()


def test_headers_the_caller_sets_win_over_the_stored_trace(
    traced_app: Celery, provider: TracerProvider, tmp_path: Path
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    create_tables(engine)
    mine = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with provider.get_tracer("test").start_as_current_span("request"), Session(engine) as session:
        TaskOutbox(traced_app).apply_async(
            "unit.traced", session=session, headers={"traceparent": mine}
        )
        session.commit()
    with Session(engine) as session:
        stored: dict[str, Any] = session.scalars(select(OutboxMessage.options)).one()
    assert mine == stored["headers"]["traceparent"]
    assert "tracestate" not in stored["headers"], "no state of another trace"
    engine.dispose()
