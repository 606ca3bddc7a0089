"""A claimed row as the message ``apply_async`` would have published for it.

Workers, Flower, result backends and OpenTelemetry's instrumentation read the message
Celery's own protocol makes, so the relay makes it the same way: ``app.amqp``'s
``create_task_message`` for the headers, properties and body, the app's router for the
route, and the same delivery defaults. What ``apply_async`` also does on every call and
the relay has no use for is left out:

- subscribing the result backend to the task's result (a Redis ``SUBSCRIBE`` a task:
  the relay never waits for results);
- retrying the publish (a row not published stays pending, and the next batch retries);
- making the task a child of the task that publishes (the beat sweep is a task, but the
  outbox task was asked for by the request that wrote the row, not by the sweep);
- sending the ``before_task_publish``/``after_task_publish`` signals when nobody is
  connected to them. When a receiver is (OpenTelemetry's Celery instrumentation is),
  they are sent around the publish, with the same arguments as Celery's.

``tests/integration/test_message_format.py`` compares the messages with what
``apply_async`` publishes, byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from celery import Celery, Task, signals
from kombu.common import Broadcast

from outbox.consumers.lifecycle import ROW_ID_HEADER
from outbox.enqueue.serialization import decode_wire
from outbox.ordering.handover import KEY_HEADER, SEQ_HEADER

if TYPE_CHECKING:
    from outbox.data.outbox_rows import ClaimedRow


class RowFailedError(Exception):
    """This row cannot be published; the message says why."""


#: ``send_task_message``'s own parameters: everything else left in the routed options
#: becomes a message property, as in Celery.
_SENDER_PARAMETERS = frozenset(
    {
        "exchange",
        "routing_key",
        "queue",
        "event_dispatcher",
        "retry",
        "retry_policy",
        "serializer",
        "delivery_mode",
        "compression",
        "declare",
        "headers",
        "exchange_type",
        "timeout",
        "confirm_timeout",
    }
)


@dataclass(slots=True)
class TaskMessage:
    """One row's message, ready for ``kombu.Producer.publish(body, **publish)``."""

    row: ClaimedRow
    task: Task[Any, Any]
    body: Any
    #: Keyword arguments for ``Producer.publish``: route, headers, properties.
    publish: dict[str, Any]
    #: The ``task-sent`` event's fields, when the app sends it.
    sent_event: dict[str, Any] | None
    #: The name of the queue it is routed to (``None`` for an exchange without one).
    queue: str | None

    @property
    def headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = self.publish["headers"]
        return headers

    @property
    def route(self) -> Route:
        """Where the message goes, as the row records it once it is on the broker."""
        exchange = self.publish["exchange"]
        exchange = getattr(exchange, "name", exchange)
        routing_key = self.publish["routing_key"]
        return Route(
            self.queue,
            str(exchange) if exchange is not None else None,
            str(routing_key) if routing_key is not None else None,
        )


class Route(NamedTuple):
    """The queue, exchange and routing key a task was published to (``None`` where the
    publish named none: ``""`` is the default exchange)."""

    queue: str | None
    exchange: str | None
    routing_key: str | None


class MessageBuilder:
    """Builds rows' messages for one Celery app, with its configuration read once."""

    def __init__(self, celery_app: Celery) -> None:
        self.app = celery_app
        self._amqp = celery_app.amqp
        conf = celery_app.conf
        self._send_sent_event = bool(conf.task_send_sent_event)
        self._default_delivery_mode = conf.task_default_delivery_mode
        self._default_exchange = self._amqp.default_exchange
        self._default_routing_key = conf.task_default_routing_key
        self._serializer = conf.task_serializer
        self._compression = conf.task_compression

    @property
    def events(self) -> Any:
        """The dispatcher Celery itself sends ``task-sent`` with (it publishes through
        the producer it is given, so it needs no connection of its own)."""
        return getattr(self._amqp, "_event_dispatcher")  # noqa: B009 - private to Celery, untyped

    def build(self, row: ClaimedRow) -> TaskMessage:
        """The message for ``row``; raises ``RowFailedError`` when the row is at fault."""
        task = self.app.tasks.get(row.task_name)
        if task is None:
            raise RowFailedError(f"task {row.task_name!r} is not registered with the relay's app")
        try:
            return self._build(row, task)
        except RowFailedError:
            raise
        except Exception as e:  # whatever Celery refuses about this row's task or options
            raise RowFailedError(f"{type(e).__name__}: {e}") from e

    def _build(self, row: ClaimedRow, task: Task[Any, Any]) -> TaskMessage:
        args = decode_wire(row.args)
        kwargs = decode_wire(row.kwargs)
        options: dict[str, Any] = decode_wire(row.options)
        # Lets the worker record the task's lifecycle on this row by key
        # (outbox.consumers.lifecycle).
        headers = {**(options.pop("headers", None) or {}), ROW_ID_HEADER: row.id}
        if row.ordering_key is not None:
            # Lets the worker hand the key on when the task finishes (outbox.ordering).
            headers[KEY_HEADER] = row.ordering_key
            headers[SEQ_HEADER] = row.ordering_seq

        # What Task.apply_async does before handing over to the app.
        if task.typing:
            check = getattr(task, "__header__", None)
            if check is not None:
                try:
                    check(*(args or ()), **(kwargs or {}))
                except TypeError as e:
                    raise RowFailedError(
                        f"the arguments stored for {row.task_name!r} do not fit it: {e}"
                    ) from e
        # Celery's own hooks, some untyped in its stubs.
        hooks = cast(Any, task)
        if getattr(task, "__v2_compat__", False):
            shadow = hooks.shadow_name(hooks(), args, kwargs, options)
        else:
            shadow = hooks.shadow_name(args, kwargs, options)
        options = dict(hooks._get_exec_options(), **options)
        dump_models: Callable[..., Any] | None = getattr(task, "_dump_pydantic_arguments", None)
        if dump_models is not None:
            args, kwargs = dump_models(args, kwargs)
        options.setdefault("ignore_result", task.ignore_result)

        # What Celery.send_task does, for the options the outbox stores.
        time_limit = options.pop("time_limit", None)
        soft_time_limit = options.pop("soft_time_limit", None)
        expires = options.pop("expires", None)
        ignore_result = options.pop("ignore_result", None)
        # A queue neither declared nor creatable raises QueueNotFound: the row's fault.
        options = self._amqp.router.route(options, row.task_name, args, kwargs, hooks)
        if expires is not None:
            # Stored by outbox.enqueue.options as an aware ISO 8601 moment.
            expires_at = datetime.fromisoformat(expires) if isinstance(expires, str) else expires
            options["expiration"] = max(0.0, (expires_at - self.app.now()).total_seconds())
        task_id = str(row.task_id)
        headers2, properties, body, sent_event = self._amqp.create_task_message(
            task_id,
            row.task_name,
            args,
            kwargs,
            None,
            None,
            None,
            None,
            expires,
            0,
            None,
            None,
            None,
            self.app.thread_oid,
            time_limit,
            soft_time_limit,
            self._send_sent_event,
            None,
            None,
            shadow,
            None,
            ignore_result=ignore_result,
            replaced_task_nesting=0,
            **options,
        )
        for stamp in options.pop("stamped_headers", None) or []:
            options.pop(stamp, None)

        # What the app's send_task_message does with the routed options.
        headers2.update(headers)
        properties.update({k: v for k, v in options.items() if k not in _SENDER_PARAMETERS})
        queue = options.get("queue")
        exchange = options.get("exchange")
        routing_key = options.get("routing_key")
        queue_name = queue if isinstance(queue, str) else None
        if queue is None and exchange is None:
            queue = self._amqp.default_queue
        if queue is not None:
            if isinstance(queue, str):
                queue = self._amqp.queues[queue]
            queue_name = queue.name
        delivery_mode = options.get("delivery_mode")
        if delivery_mode is None:
            delivery_mode = getattr(getattr(queue, "exchange", None), "delivery_mode", None)
            delivery_mode = delivery_mode or self._default_delivery_mode
        exchange_type = options.get("exchange_type")
        if exchange_type is None:
            exchange_type = getattr(getattr(queue, "exchange", None), "type", "direct")
        if (not exchange or not routing_key) and exchange_type == "direct":
            exchange, routing_key = "", queue_name
        elif exchange is None:
            routed = cast(Any, queue)  # the default queue, set above, when both were missing
            exchange = routed.exchange.name or self._default_exchange
            routing_key = routing_key or routed.routing_key or self._default_routing_key
        declare = options.get("declare")
        if declare is None and queue is not None and not isinstance(queue, Broadcast):
            declare = [queue]
        publish = {
            "exchange": exchange,
            "routing_key": routing_key,
            "serializer": options.get("serializer") or self._serializer,
            "compression": options.get("compression") or self._compression,
            "delivery_mode": delivery_mode,
            "declare": declare,
            "headers": headers2,
            **properties,
        }
        if sent_event is not None:
            sent_event.update(
                {
                    "queue": queue_name,
                    "exchange": getattr(exchange, "name", exchange),
                    "routing_key": routing_key,
                }
            )
        return TaskMessage(row, task, body, publish, sent_event, queue_name)


def announce_before(message: TaskMessage) -> None:
    """``before_task_publish``, with Celery's arguments, if anyone listens."""
    if signals.before_task_publish.receivers:
        publish = message.publish
        signals.before_task_publish.send(
            sender=message.row.task_name,
            body=message.body,
            exchange=publish["exchange"],
            routing_key=publish["routing_key"],
            declare=publish["declare"],
            headers=publish["headers"],
            properties={k: v for k, v in publish.items() if k not in _SENDER_PARAMETERS},
            retry_policy={},
        )


def announce_after(message: TaskMessage) -> None:
    """``after_task_publish``, with Celery's arguments, if anyone listens."""
    if signals.after_task_publish.receivers:
        publish = message.publish
        signals.after_task_publish.send(
            sender=message.row.task_name,
            body=message.body,
            headers=publish["headers"],
            exchange=publish["exchange"],
            routing_key=publish["routing_key"],
        )


__all__ = [
    "MessageBuilder",
    "Route",
    "RowFailedError",
    "TaskMessage",
    "announce_after",
    "announce_before",
]
