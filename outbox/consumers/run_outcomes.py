"""How a task's run ended, told apart the way the outbox needs: for good, or not yet.

Celery reports two endings that are not the end of the task:

- ``Reject(requeue=True)`` hands the message back to the broker, which delivers it
  again: Celery's state is ``REJECTED``, as for a rejection that drops the message.
- ``self.replace(signature)`` publishes the replacement under the *same task id* and
  raises ``Ignore``: Celery's state is ``IGNORED``, as for a task that ignores itself.

The outbox records these two as ``REQUEUED`` and ``REPLACED`` (states of its own, in
the row's ``task_state``), so that neither hands an ordering key on, blocks it, or
counts as processed: the run that comes next does.
"""

from __future__ import annotations

from types import FrameType, TracebackType
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject

#: A run that handed its message back to the broker to be delivered again.
REQUEUED = "REQUEUED"
#: A run that replaced itself (``self.replace``): the replacement runs under its id.
REPLACED = "REPLACED"

#: Celery's own handler of a replacement, which publishes it and raises ``Ignore``; an
#: override must call it (Celery's documentation says so), so it is on the stack.
_ON_REPLACE = Task.on_replace.__code__


def was_requeued(error: object) -> bool:
    """Whether ``error`` hands the message back to the broker (``Reject(requeue=True)``)."""
    return isinstance(error, Reject) and bool(getattr(error, "requeue", False))


def was_replaced(error: object) -> bool:
    """Whether ``error`` is the ``Ignore`` that ``Task.replace`` raises after publishing
    the replacement, rather than a task ignoring itself.

    Told by where it was raised: Celery's ``Task.on_replace`` is in its traceback (a
    code object survives Celery clearing the frames' variables after the run).
    """
    return _on_replace_frame(error) is not None


def replacement_task(error: object, task_id: str) -> str | None:
    """The name of the task that runs under ``task_id`` in the replacement ``error`` was
    raised for (the replacing signature itself, or the step of a chain Celery gave the
    id to); ``None`` when it cannot be told (Celery has cleared the frame)."""
    frame = _on_replace_frame(error)
    signature: Any = frame.f_locals.get("sig") if frame is not None else None
    if signature is None:
        return None
    for step in [signature, *(getattr(signature, "tasks", None) or ())]:
        options = getattr(step, "options", None) or {}
        if options.get("task_id") == task_id:
            name = step.get("task") if isinstance(step, dict) else None
            return name if isinstance(name, str) else None
    return None


def _on_replace_frame(error: object) -> FrameType | None:
    if not isinstance(error, Ignore):
        return None
    tb: TracebackType | None = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is _ON_REPLACE:
            return tb.tb_frame
        tb = tb.tb_next
    return None


def recorded_state(state: str, outcome: object) -> str:
    """The state to record for a run that ended in Celery's ``state`` with ``outcome``
    (the return value or exception ``task_postrun`` reports)."""
    if state == "REJECTED" and was_requeued(outcome):
        return REQUEUED
    if state == "IGNORED" and was_replaced(outcome):
        return REPLACED
    return state
