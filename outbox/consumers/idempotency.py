"""Effectively-once consumers: a task's effects and the record that it ran commit together.

The outbox delivers at least once: a relay that dies between publishing and marking
publishes again, under the same task id. A consumer wrapped with :func:`idempotent`
inserts that id into ``celery_outbox_processed`` *first*, in the same transaction as the
task's own writes, and commits both at the end:

- a repeat delivery finds the id already committed and does nothing;
- two deliveries running at once collide on the primary key; the loser rolls back, its
  effects with it;
- a task that is killed mid-way commits nothing, so the next delivery runs it in full.
  That is what makes it safe with ``acks_late=True``.

How a run that raises ends depends on why it raised (see :func:`idempotent`): only a
failure of the task's own is recorded as consumed. A failure of the infrastructure
(the database unreachable, the connection dropped) is retried, and a task that Celery
is about to run again (``self.retry()``, ``autoretry_for``, ``Reject(requeue=True)``) is
left for that run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar, cast

from celery import current_task
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.time import get_exponential_backoff_interval
from kombu.exceptions import OperationalError as BrokerUnavailable
from sqlalchemy import event, inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, scoped_session

from outbox.clock import utcnow
from outbox.consumers.run_outcomes import replacement_task, was_replaced
from outbox.data.schema import ProcessedMessage
from outbox.errors import IdempotencyError
from outbox.ordering.handover import finish, place_of, row_of_task
from outbox.transient import is_transient_database_error

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

#: Retries of a run that failed because the database was unreachable, by default.
DEFAULT_TRANSIENT_RETRIES = 10
#: Longest pause between two of them (seconds): 1, 2, 4, ... with full jitter, up to this.
#: Kept under a minute, so a retry waiting in a worker is not taken for a message its
#: worker died holding by a broker with a one-minute visibility timeout.
TRANSIENT_BACKOFF_MAX = 30


def idempotent(
    session: Callable[[], Session | scoped_session[Session]],
    *,
    transient_retries: int = DEFAULT_TRANSIENT_RETRIES,
) -> Callable[[Callable[P, R]], Callable[P, R | None]]:
    """Make a Celery task function apply its database effects at most once per task id.

    ``session`` returns the session the task writes its effects with. The wrapped function
    must neither commit nor roll back: the wrapper commits its writes together with the
    processed marker, and raises :class:`~outbox.IdempotencyError` (committing nothing)
    if the function tried. A repeat of an id already processed returns ``None`` without
    calling the function.

    A run that raises commits none of its effects, and then:

    - **the database was unreachable** (a refused, dropped or reset connection; see
      :func:`outbox.is_transient_database_error`): nothing is recorded, and the task is
      retried with exponential backoff, up to ``transient_retries`` times (``0``: never);
      past that it fails unrecorded, and the outbox publishes it again;
    - **Celery will run it again** (``self.retry()``, an exception in the task's
      ``autoretry_for`` with retries left, ``Reject(requeue=True)``): nothing is recorded,
      so that run goes ahead;
    - **the task failed on its own** (any other exception): it is recorded as consumed,
      as Celery acknowledges it, and the outbox does not publish it again.

    Side effects outside the database cannot join the transaction; make them idempotent
    with the task id too (``self.request.id``), e.g. as the idempotency key of an email or
    payment API, so that a run interrupted after the call and before the commit is
    harmless when it is repeated.
    """
    if transient_retries < 0:
        raise ValueError(f"transient_retries={transient_retries!r} must be >= 0")

    def decorate(function: Callable[P, R]) -> Callable[P, R | None]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
            request = getattr(current_task, "request", None)
            task_id = getattr(request, "id", None)
            db = session()
            if _inside.get():
                # Called from another idempotent task: its transaction is ours.
                return function(*args, **kwargs)
            if task_id is None:
                # Called as a plain function: there is no delivery to deduplicate.
                with _guarded():
                    result = function(*args, **kwargs)
                db.commit()
                return result
            if db.new or db.dirty or db.deleted:
                raise IdempotencyError(
                    f"task {current_task.name}[{task_id}] started with unsaved changes in its "
                    "session: they would commit with the task's effects. Commit or roll back "
                    "before the task runs."
                )
            name = current_task.name
            try:
                return _run_once(db, task_id, name, function, args, kwargs)
            except BaseException as error:
                _discard(db)
                if isinstance(error, IntegrityError) and _processed_meanwhile(db, task_id):
                    logger.info("task %s[%s] processed concurrently: skipped", name, task_id)
                    return None
                if not isinstance(error, Exception) or _runs_again(error):
                    # The process is going down, or Celery runs the task again: nothing
                    # was consumed.
                    raise
                if is_transient_database_error(error):
                    _retry_later(error, transient_retries)
                    raise
                if isinstance(error, Ignore):
                    _record_ignored(db, task_id, name, error)
                    raise
                _record_consumed(db, task_id, name, f"{type(error).__name__}: {error}")
                raise

        # Tells the relay this consumer records what it processed, so a dispatched task
        # that never gets recorded can be presumed lost and published again.
        wrapper.__outbox_idempotent__ = True  # type: ignore[attr-defined]
        return wrapper

    return decorate


def _run_once(
    db: Session | scoped_session[Session],
    task_id: str,
    name: str,
    function: Callable[..., R],
    args: Any,
    kwargs: Any,
) -> R | None:
    """Claim the id, run the function, commit both; ``None`` if the id was processed."""
    marker = ProcessedMessage(task_id=task_id, task_name=name, processed_at=utcnow())
    db.add(marker)
    try:
        # Claim the id before doing any work: a concurrent duplicate blocks here until
        # the first commits, then fails on the primary key.
        db.flush()
    except IntegrityError:
        _discard(db)
        if not _already_processed(db, task_id):
            raise
        logger.info("task %s[%s] already processed: skipped", name, task_id)
        return None
    transaction = _session(db).get_transaction()
    with _guarded(db):
        result = function(*args, **kwargs)
    _check_still_claimed(db, transaction, marker)
    _hand_on_key(db)
    db.commit()
    return result


def _hand_on_key(db: Session | scoped_session[Session], error: str | None = None) -> None:
    """An ordered task's key goes to its next task in the transaction that records this
    one, so a crash can never leave one done without the other (``outbox.ordering.keys``)."""
    request: Any = getattr(current_task, "request", None)
    place = place_of(request)
    if place is None and getattr(request, "replaced_task_nesting", None):
        # A replacement runs under the replaced task's id without the relay's headers.
        row = row_of_task(db, request.id)
        place = row[1] if row is not None else None
    if place is not None:
        finish(db, place, utcnow(), error=error)


def _runs_again(error: BaseException) -> bool:
    """Whether Celery itself will run this task again after ``error``."""
    if isinstance(error, Retry):
        return True
    if isinstance(error, Reject):
        # A requeued message is delivered again. So is one whose self.retry() could not
        # reach the broker (Celery then rejects the original): the retry never left, and
        # the outbox must publish the task again.
        requeue, reason = getattr(error, "requeue", False), getattr(error, "reason", None)
        return bool(requeue) or isinstance(reason, BrokerUnavailable)
    task = _current_task()
    autoretry_for = tuple(getattr(task, "autoretry_for", ()) or ())
    if not autoretry_for or isinstance(error, Ignore):
        return False
    if isinstance(error, tuple(getattr(task, "dont_autoretry_for", ()) or ())):
        return False
    max_retries = task.max_retries
    return isinstance(error, autoretry_for) and (
        max_retries is None or task.request.retries < max_retries
    )


def _retry_later(error: Exception, budget: int) -> None:
    """Retry the current task after a transient database failure, if the budget allows.

    Returns (and the caller re-raises ``error`` unrecorded) once the budget is spent.
    """
    task = _current_task()
    retries = task.request.retries
    if retries >= budget:
        logger.warning(
            "task %s[%s] failed %d times because the database was unreachable: giving up "
            "on this delivery unrecorded, so the outbox publishes it again",
            task.name,
            task.request.id,
            retries + 1,
        )
        return
    countdown = max(
        1,
        get_exponential_backoff_interval(
            factor=1, retries=retries, maximum=TRANSIENT_BACKOFF_MAX, full_jitter=True
        ),
    )
    logger.warning(
        "task %s[%s] could not reach the database (%s: %s): retrying in %ds",
        task.name,
        task.request.id,
        type(error).__name__,
        error,
        countdown,
    )
    had_override = hasattr(task, "override_max_retries")
    try:
        raise task.retry(exc=error, countdown=countdown, max_retries=budget)
    finally:
        # Task.retry leaves the override on the shared task object; a later run of the
        # same task must see its own max_retries again.
        if not had_override and hasattr(task, "override_max_retries"):
            del task.override_max_retries


#: True while an idempotent function runs, so nested ones join its transaction.
_inside: ContextVar[bool] = ContextVar("outbox_idempotent_inside", default=False)


@contextmanager
def _guarded(db: Session | scoped_session[Session] | None = None) -> Iterator[None]:
    """Mark the block as inside an idempotent task and refuse commits from within it."""
    token = _inside.set(True)
    target = _session(db) if db is not None else None
    if target is not None:
        event.listen(target, "before_commit", _refuse_commit)
    try:
        yield
    finally:
        if target is not None:
            event.remove(target, "before_commit", _refuse_commit)
        _inside.reset(token)


def _check_still_claimed(
    db: Session | scoped_session[Session], transaction: object, marker: ProcessedMessage
) -> None:
    """Raise if the function rolled back the transaction that holds the marker."""
    if _session(db).get_transaction() is not transaction or not inspect(marker).persistent:
        raise IdempotencyError(
            f"task {marker.task_name}[{marker.task_id}] rolled back its session: the processed "
            "marker went with it, and committing the rest would apply the effects again on "
            "every redelivery. Let exceptions propagate instead of rolling back inside an "
            "idempotent task."
        )


def _refuse_commit(session: Session) -> None:
    raise IdempotencyError(
        "an idempotent task committed its session itself: the wrapper commits the task's "
        "effects together with its processed marker. Remove the commit from the task."
    )


def _session(db: Session | scoped_session[Session]) -> Session:
    return db() if isinstance(db, scoped_session) else db


def _discard(db: Session | scoped_session[Session]) -> None:
    """Roll back whatever the run did; a connection that is already gone is let go of."""
    try:
        db.rollback()
    except Exception:
        logger.debug("rollback failed; closing the session", exc_info=True)
        db.close()


def _record_consumed(
    db: Session | scoped_session[Session],
    task_id: str,
    name: str,
    error: str | None,
    *,
    hand_on: bool = True,
) -> None:
    """Record a task that ended without its effects as consumed, in a transaction of its
    own: its ordering key is stopped at it when it failed on its own (``error``), handed
    on when it ignored itself, left alone (``hand_on=False``) when another run ends it."""
    try:
        db.add(ProcessedMessage(task_id=task_id, task_name=name, processed_at=utcnow()))
        db.flush()
        if hand_on:
            _hand_on_key(db, error)
        db.commit()
    except IntegrityError:
        _discard(db)
    except Exception:
        _discard(db)
        logger.exception("could not record failed task %s[%s] as consumed", name, task_id)


def _record_ignored(
    db: Session | scoped_session[Session], task_id: str, name: str, error: Ignore
) -> None:
    """A run that raised ``Ignore``: a task that ignores itself is done (its key goes on,
    as after a success); one that replaced itself is not, since the replacement runs
    under the same id. Then nothing is recorded when the replacement records the id
    itself (it is an idempotent consumer too); otherwise the id is recorded, so that the
    outbox does not publish this task again, and the key waits for the replacement's end
    (which lifecycle tracking reports)."""
    if not was_replaced(error):
        _record_consumed(db, task_id, name, None)
        return
    replacement = replacement_task(error, task_id)
    task = current_task.app.tasks.get(replacement) if replacement is not None else None
    if replacement is None or (task is not None and confirms_processing(task)):
        logger.info("task %s[%s] replaced by %s: it records the id", name, task_id, replacement)
        return
    _record_consumed(db, task_id, name, None, hand_on=False)


def _current_task() -> Any:
    """The running task object itself, not Celery's proxy to it."""
    return cast(Any, current_task)._get_current_object()


def confirms_processing(task: object) -> bool:
    """Whether ``task``'s function records processed ids (is wrapped by :func:`idempotent`)."""
    return bool(getattr(getattr(task, "run", None), "__outbox_idempotent__", False))


def _already_processed(db: Session | scoped_session[Session], task_id: str) -> bool:
    return db.get(ProcessedMessage, task_id) is not None


def _processed_meanwhile(db: Session | scoped_session[Session], task_id: str) -> bool:
    """After a failed commit: whether a concurrent delivery recorded the id first."""
    try:
        return _already_processed(db, task_id)
    except Exception:  # the database went away meanwhile: the caller classifies the error
        _discard(db)
        return False
