"""Recording tasks in the caller's transaction instead of publishing them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

from celery import Celery, Task
from celery.canvas import Signature
from celery.exceptions import QueueNotFound
from celery.result import AsyncResult
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, scoped_session

from outbox.clock import utcnow
from outbox.consumers.idempotency import confirms_processing
from outbox.data import store_for
from outbox.data.schema import OutboxStatus, keys_table
from outbox.data.session_rows import add_row, insert_row
from outbox.enqueue.options import resolve_options
from outbox.enqueue.serialization import encode
from outbox.errors import (
    MissingSessionError,
    OrderingNotTrackedError,
    PayloadTooLargeError,
    QueueNotDeclaredError,
    TaskNotRegisteredError,
    UnsupportedOptionError,
)
from outbox.ordering.keys import check_key
from outbox.settings import OutboxSettings
from outbox.tracing import current_trace_headers

#: What a task can be enqueued into: the caller's ORM session or Core connection.
SessionLike: TypeAlias = Session | scoped_session[Session] | Connection
#: A task object or its registered name.
TaskRef: TypeAlias = Task[Any, Any] | str


@dataclass(frozen=True, slots=True)
class EnqueuedTask:
    """What one enqueue call recorded, as stored (arguments in Celery's JSON form)."""

    task_id: str
    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    available_at: datetime
    ordering_key: str | None = None


class TaskOutbox:
    """Enqueue Celery tasks as rows in the caller's database transaction.

    The framework-agnostic core: give it the Celery app the tasks are registered with and,
    optionally, a function returning the default session (Flask-SQLAlchemy's ``db.session``
    is what :class:`outbox.contrib.flask.Outbox` passes).
    """

    def __init__(
        self,
        celery_app: Celery,
        *,
        default_session: Callable[[], SessionLike] | None = None,
        settings: OutboxSettings | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.celery_app = celery_app
        self.settings = settings or OutboxSettings()
        self._default_session = default_session
        #: Called with each enqueued task's record; ``outbox.testing`` captures through it.
        self.observers: list[Callable[[EnqueuedTask], None]] = []
        self._clock = clock

    def delay(self, task: TaskRef, /, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """Outbox form of ``task.delay(*args, **kwargs)``, in the default session.

        The task is invisible until the session's transaction commits and is gone if it
        rolls back. To use another session, call :meth:`apply_async` with ``session=``.
        """
        return self.apply_async(task, args=args, kwargs=kwargs)

    def apply_async(
        self,
        task: TaskRef,
        /,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        session: SessionLike | None = None,
        ordering_key: str | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """Outbox form of ``task.apply_async(args, kwargs, **options)``.

        Adds one outbox row to ``session`` (the default session when omitted) and returns
        an :class:`~celery.result.AsyncResult` whose id is the task id the task will be
        published and run under. Nothing is committed or flushed here: the task is
        invisible until the caller commits and gone if the caller rolls back. With an ORM
        session the row is inserted at the caller's next flush; with a Core connection it
        is inserted at once, inside the connection's open transaction.

        Supported options: ``countdown``, ``eta`` (the row waits in the outbox until due),
        ``expires``, ``queue``, ``routing_key``, ``priority``, ``headers``,
        ``time_limit``, ``soft_time_limit``. Anything else raises
        :class:`~outbox.UnsupportedOptionError`. Arguments must serialize with Celery's
        JSON serializer (:class:`~outbox.ArgumentNotSerializableError` otherwise) and fit
        in ``settings.max_payload_bytes`` (:class:`~outbox.PayloadTooLargeError`).

        With ``ordering_key``, the task runs only after every task enqueued earlier with
        the same key has finished, in the order their transactions commit
        (``outbox.ordering.keys``). The key's row is locked from the enqueue (on PostgreSQL
        with a Session, from the flush that inserts the row) until the caller's
        transaction ends, so enqueue ordered tasks last, just before the commit: another
        writer to the same key waits for it. The task must be able to report that it finished: an
        idempotent consumer, or any task while lifecycle tracking is on
        (:class:`~outbox.OrderingNotTrackedError` otherwise).
        """
        name = self._registered_name(task)
        if ordering_key is not None:
            ordering_key = check_key(ordering_key)
            self._check_reports_finish(name)
        now = self._clock()
        resolved = resolve_options(options, now)
        # Celery's own answer, read when it built its queues from task_create_missing_queues:
        # the one its router acts on (and no settings lookup on every call).
        if not self.celery_app.amqp.queues.create_missing:  # type: ignore[attr-defined]
            self._check_queue(name, resolved.publish, args, kwargs)
        wire_args, args_size = encode(list(args or ()), where="args")
        wire_kwargs, kwargs_size = encode(dict(kwargs or {}), where="kwargs")
        if args_size + kwargs_size > self.settings.max_payload_bytes:
            raise PayloadTooLargeError(
                f"task {name!r}: args and kwargs serialize to {args_size + kwargs_size} bytes, "
                f"over the {self.settings.max_payload_bytes}-byte limit (OUTBOX_MAX_PAYLOAD_BYTES):"
                " store large data in the database and pass its id instead."
            )
        publish = resolved.publish
        caller_headers = publish.get("headers", {})
        if "traceparent" not in caller_headers and (trace_headers := current_trace_headers()):
            # The caller's trace continues in the worker (outbox.tracing). A
            # caller that set its own traceparent keeps it, and no tracestate of another
            # trace.
            publish = {**publish, "headers": {**trace_headers, **caller_headers}}
        task_id = uuid.uuid4()
        values: dict[str, Any] = {
            "task_id": task_id,
            "task_name": name,
            "args": wire_args,
            "kwargs": wire_kwargs,
            "options": publish,
            "status": OutboxStatus.PENDING,
            "attempts": 0,
            "created_at": now,
            "available_at": resolved.available_at,
        }
        target = session if session is not None else self._session()
        if ordering_key is not None:
            values["ordering_key"] = ordering_key
            store = store_for(target)
            if isinstance(target, Connection) or not store.numbers_keys_at_flush:
                seq, holds_key = store.next_in_line(target, keys_table, ordering_key, now)
                values["ordering_seq"] = seq
                if not holds_key:
                    values["status"] = OutboxStatus.HELD
            # Otherwise the flush's one statement takes the key's next numbers, and holds
            # the key's row from then until the transaction ends (Store.insert_rows).
        if isinstance(target, Connection):
            insert_row(target, values)
        else:
            add_row(target, values)
        if self.observers:
            enqueued = EnqueuedTask(
                task_id=str(task_id),
                task_name=name,
                args=wire_args,
                kwargs=wire_kwargs,
                options=publish,
                available_at=resolved.available_at,
                ordering_key=ordering_key,
            )
            for observe in self.observers:
                observe(enqueued)
        return self.celery_app.AsyncResult(str(task_id))

    def enqueue(
        self,
        signature: Signature[Any],
        /,
        *,
        session: SessionLike | None = None,
        ordering_key: str | None = None,
    ) -> AsyncResult[Any]:
        """Enqueue a Celery signature, e.g. ``task.s(order_id).set(queue="mail")``.

        Same transaction semantics as :meth:`apply_async`: invisible until the caller
        commits, gone if the caller rolls back. Only single-task signatures are accepted;
        chains, groups and chords are refused.
        """
        if type(signature) is not Signature or signature.subtask_type or not signature.task:
            raise UnsupportedOptionError(
                f"{signature!r} is a {type(signature).__name__}: the outbox stores single task "
                "signatures only. Enqueue each task, or start the workflow from a task."
            )
        return self.apply_async(
            str(signature.task),
            args=signature.args,
            kwargs=signature.kwargs,
            session=session,
            ordering_key=ordering_key,
            **signature.options,
        )

    def ordered(self, ordering_key: str) -> OrderedOutbox:
        """The outbox with every task enqueued under ``ordering_key``:
        ``outbox.ordered(f"order:{order.id}").delay(notify, order.id)``."""
        return OrderedOutbox(self, check_key(ordering_key))

    def _check_reports_finish(self, name: str) -> None:
        if self.settings.track_lifecycle or confirms_processing(self.celery_app.tasks[name]):
            return
        raise OrderingNotTrackedError(
            f"task {name!r} cannot be enqueued with an ordering key: it is not an idempotent "
            "consumer (@outbox.idempotent) and lifecycle tracking is off "
            "(OUTBOX_TRACK_LIFECYCLE), so nothing would report that it finished and its "
            "key would never go on. Make it idempotent, or turn lifecycle tracking on."
        )

    def _registered_name(self, task: TaskRef) -> str:
        name = task if isinstance(task, str) else getattr(task, "name", None)
        if not isinstance(name, str) or name not in self.celery_app.tasks:
            raise TaskNotRegisteredError(
                f"task {name or task!r} is not registered with Celery app "
                f"{self.celery_app.main!r}: import the module that defines it (or add it to "
                "the app's `include`) before enqueueing, so the relay and workers know it."
            )
        return name

    def _check_queue(
        self,
        name: str,
        publish: Mapping[str, Any],
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
    ) -> None:
        """Refuse a task routed to a queue the app does not declare and will not create:
        the relay could never publish it."""
        wanted = {"queue": publish["queue"]} if "queue" in publish else {}
        try:
            self.celery_app.amqp.router.route(wanted, name, tuple(args or ()), dict(kwargs or {}))
        except QueueNotFound as e:
            raise QueueNotDeclaredError(
                f"task {name!r} would be published to a queue that is not in task_queues "
                f"({e.args[0] if e.args else e}), and task_create_missing_queues is off: "
                "declare the queue in task_queues, or route the task to one that is."
            ) from e

    def _session(self) -> SessionLike:
        if self._default_session is None:
            raise MissingSessionError(
                "no session= was given and this TaskOutbox has no default_session: pass the "
                "SQLAlchemy Session or Connection whose transaction the task belongs to."
            )
        return self._default_session()


@dataclass(frozen=True, slots=True)
class OrderedOutbox:
    """:meth:`TaskOutbox.delay`, :meth:`~TaskOutbox.apply_async` and
    :meth:`~TaskOutbox.enqueue` with one ordering key (:meth:`TaskOutbox.ordered`)."""

    outbox: TaskOutbox
    ordering_key: str

    def delay(self, task: TaskRef, /, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        return self.outbox.apply_async(
            task, args=args, kwargs=kwargs, ordering_key=self.ordering_key
        )

    def apply_async(
        self,
        task: TaskRef,
        /,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        session: SessionLike | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        return self.outbox.apply_async(
            task, args, kwargs, session=session, ordering_key=self.ordering_key, **options
        )

    def enqueue(
        self, signature: Signature[Any], /, *, session: SessionLike | None = None
    ) -> AsyncResult[Any]:
        return self.outbox.enqueue(signature, session=session, ordering_key=self.ordering_key)
