"""Effectively-once consumers: a task's effects and the record that it ran commit together.

The outbox delivers at least once: a relay that dies between publishing and marking
publishes again, under the same task id. A consumer wrapped with :func:`idempotent`
inserts that id into ``celery_outbox_processed`` *first*, in the same transaction as the
task's own writes, and commits both at the end:

- a repeat delivery finds the id already committed and does nothing;
- two deliveries running at once collide on the primary key; the loser rolls back, its
  effects with it;
- a task that raises, retries (``self.retry()`` keeps the id) or is killed mid-way
  commits nothing, so the next delivery runs it in full. That is what makes it safe with
  ``acks_late=True``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

from celery import current_task
from celery.exceptions import Retry
from sqlalchemy import ColumnElement, Dialect, String, cast, event, func, inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, scoped_session

from outbox.enqueue import utcnow
from outbox.errors import IdempotencyError
from outbox.schema import Base, UTCDateTime

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


class ProcessedMessage(Base):
    """A task id whose effects have been committed by an idempotent consumer."""

    __tablename__ = "celery_outbox_processed"

    task_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    task_name: Mapped[str] = mapped_column(String(255), nullable=False)
    processed_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)

    @classmethod
    def task_id_matches(
        cls, outbox_task_id: ColumnElement[Any], dialect: Dialect
    ) -> ColumnElement[bool]:
        """SQL: this row's task id equals an outbox row's UUID ``task_id``.

        Celery task ids are UUID strings with hyphens; the outbox stores a native UUID on
        PostgreSQL and 32 hex digits on SQLite.
        """
        if dialect.name == "sqlite":
            # Rebuild the hyphenated form from the hex rather than strip the hyphens from
            # ours, so the comparison can use this table's primary key.
            hexed = outbox_task_id
            hyphenated = (
                func.substr(hexed, 1, 8)
                + "-"
                + func.substr(hexed, 9, 4)
                + "-"
                + func.substr(hexed, 13, 4)
                + "-"
                + func.substr(hexed, 17, 4)
                + "-"
                + func.substr(hexed, 21, 12)
            )
            return cls.task_id == hyphenated
        return cls.task_id == cast(outbox_task_id, String)


def idempotent(
    session: Callable[[], Session | scoped_session[Session]],
) -> Callable[[Callable[P, R]], Callable[P, R | None]]:
    """Make a Celery task function apply its database effects at most once per task id.

    ``session`` returns the session the task writes its effects with. The wrapped function
    must neither commit nor roll back: the wrapper commits its writes together with the
    processed marker, and raises :class:`~outbox.IdempotencyError` (committing nothing)
    if the function tried. A repeat of an id already processed returns ``None`` without
    calling the function.

    A task that raises (other than through ``self.retry()``) commits nothing of its own
    but is recorded as consumed, as Celery acknowledges it: the outbox does not publish
    it again. ``self.retry()`` records nothing, so the retry runs.

    Side effects outside the database cannot join the transaction; make them idempotent
    with the task id too (``self.request.id``), e.g. as the idempotency key of an email or
    payment API, so that a run interrupted after the call and before the commit is
    harmless when it is repeated.
    """

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
            marker = ProcessedMessage(
                task_id=task_id, task_name=current_task.name, processed_at=utcnow()
            )
            db.add(marker)
            try:
                # Claim the id before doing any work: a concurrent duplicate blocks here
                # until the first commits, then fails on the primary key.
                db.flush()
            except IntegrityError:
                db.rollback()
                if not _already_processed(db, task_id):
                    raise
                logger.info("task %s[%s] already processed: skipped", current_task.name, task_id)
                return None
            transaction = _session(db).get_transaction()
            try:
                with _guarded(db):
                    result = function(*args, **kwargs)
                _check_still_claimed(db, transaction, marker)
                db.commit()
            except IntegrityError:
                db.rollback()
                if _already_processed(db, task_id):
                    logger.info(
                        "task %s[%s] processed concurrently: skipped", current_task.name, task_id
                    )
                    return None
                raise
            except Retry:
                db.rollback()
                raise
            except Exception:
                db.rollback()
                _record_consumed(db, task_id, current_task.name)
                raise
            except BaseException:
                # The process is going down (SystemExit, KeyboardInterrupt): nothing was
                # consumed, and the redelivery should run the task in full.
                db.rollback()
                raise
            return result

        # Tells the relay this consumer records what it processed, so a dispatched task
        # that never gets recorded can be presumed lost and published again.
        wrapper.__outbox_idempotent__ = True  # type: ignore[attr-defined]
        return wrapper

    return decorate


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


def _record_consumed(db: Session | scoped_session[Session], task_id: str, name: str) -> None:
    """Record a task that raised as consumed, in a transaction of its own."""
    try:
        db.add(ProcessedMessage(task_id=task_id, task_name=name, processed_at=utcnow()))
        db.commit()
    except IntegrityError:
        db.rollback()
    except Exception:
        db.rollback()
        logger.exception("could not record failed task %s[%s] as consumed", name, task_id)


def confirms_processing(task: object) -> bool:
    """Whether ``task``'s function records processed ids (is wrapped by :func:`idempotent`)."""
    return bool(getattr(getattr(task, "run", None), "__outbox_idempotent__", False))


def _already_processed(db: Session | scoped_session[Session], task_id: str) -> bool:
    return db.get(ProcessedMessage, task_id) is not None
