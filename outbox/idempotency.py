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
from collections.abc import Callable
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

from celery import current_task
from sqlalchemy import ColumnElement, Dialect, String, cast, func
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, scoped_session

from outbox.enqueue import utcnow
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
            return func.replace(cls.task_id, "-", "", type_=String) == outbox_task_id
        return cls.task_id == cast(outbox_task_id, String)


def idempotent(
    session: Callable[[], Session | scoped_session[Session]],
) -> Callable[[Callable[P, R]], Callable[P, R | None]]:
    """Make a Celery task function apply its database effects at most once per task id.

    ``session`` returns the session the task writes its effects with. The wrapped function
    must not commit: the wrapper commits its writes together with the processed marker.
    A repeat of an id already processed returns ``None`` without calling the function.

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
            if task_id is None:
                # Called as a plain function: there is no delivery to deduplicate.
                result = function(*args, **kwargs)
                db.commit()
                return result
            db.add(
                ProcessedMessage(
                    task_id=task_id, task_name=current_task.name, processed_at=utcnow()
                )
            )
            try:
                # Claim the id before doing any work: a concurrent duplicate blocks here
                # until the first commits, then fails on the primary key.
                db.flush()
            except IntegrityError:
                db.rollback()
                logger.info("task %s[%s] already processed: skipped", current_task.name, task_id)
                return None
            try:
                result = function(*args, **kwargs)
                db.commit()
            except IntegrityError:
                db.rollback()
                if _already_processed(db, task_id):
                    logger.info(
                        "task %s[%s] processed concurrently: skipped", current_task.name, task_id
                    )
                    return None
                raise
            except BaseException:
                db.rollback()
                raise
            return result

        # Tells the relay this consumer records what it processed, so a dispatched task
        # that never gets recorded can be presumed lost and published again.
        wrapper.__outbox_idempotent__ = True  # type: ignore[attr-defined]
        return wrapper

    return decorate


def confirms_processing(task: object) -> bool:
    """Whether ``task``'s function records processed ids (is wrapped by :func:`idempotent`)."""
    return bool(getattr(getattr(task, "run", None), "__outbox_idempotent__", False))


def _already_processed(db: Session | scoped_session[Session], task_id: str) -> bool:
    return db.get(ProcessedMessage, task_id) is not None
