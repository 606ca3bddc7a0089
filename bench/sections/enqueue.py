"""One enqueue in its parts, and the flush that writes the rows, on PostgreSQL.

The parts are what :meth:`outbox.TaskOutbox.apply_async` does in Python before any SQL:
the checks of the task and its options, Celery's serialisation of the arguments, the
row added to the session and the result handed back. Each is timed alone (the best of
a few rounds of many calls, so that a moment of noise does not count) beside the whole
call. An enqueue with an ordering key also runs one statement at once, the upsert that
takes the key's next number: timed on its own.

The flush compares the two ways a session can write ``k`` enqueued rows, side by side
in one run and in alternating order: the ORM unit of work (every column, each new id
returned and tracked) and what the outbox's ``before_flush`` listener does instead, one
INSERT of the columns an enqueue sets (``outbox.data.session_rows``). Each round begins a
transaction with one statement, as a request has by the time it enqueues, adds the rows,
flushes and rolls back.
"""

from __future__ import annotations

import time
import timeit
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from bench.context import Context, rotated
from bench.results import RATIO, Figure, median, ratios
from outbox import OutboxMessage, OutboxStatus, TaskOutbox
from outbox.clock import utcnow
from outbox.data import store_for
from outbox.data.schema import keys_table
from outbox.data.session_rows import add_row
from outbox.enqueue.options import resolve_options
from outbox.enqueue.serialization import encode
from outbox.tracing import current_trace_headers

SECTION = "enqueue"
#: Calls per round of a part, and rounds (the best round counts).
CALLS, ROUNDS = 2_000, 5
UNIT_OF_WORK, ONE_INSERT = "unit of work", "one INSERT"
KEY_UPSERT = "an ordering key's next number (its upsert, a round trip)"
#: Upserts of one key timed per round.
UPSERTS = 200
#: Enqueues into a session between two flushes, as the example's confirm makes.
PER_FLUSH = 3


def run(ctx: Context) -> list[Figure]:
    from tasks.orders import reserve_stock

    tasks = TaskOutbox(ctx.celery_app)
    name = reserve_stock.name
    now = utcnow()
    publish = resolve_options({}, now).publish
    task_id = str(uuid.uuid4())
    parts: dict[str, Callable[[], Any]] = {
        "task name check": lambda: tasks._registered_name(reserve_stock),
        "options": lambda: resolve_options({}, now),
        "queue check (routing)": lambda: tasks._check_queue(name, publish, (1,), {}),
        "serialise args [order_id]": lambda: encode([1], where="args"),
        "serialise kwargs {}": lambda: encode({}, where="kwargs"),
        "trace headers": current_trace_headers,
        "task id (uuid4)": uuid.uuid4,
        "result handed back (AsyncResult)": lambda: tasks.celery_app.AsyncResult(task_id),
    }
    figures: list[Figure] = []
    timings: dict[str, list[float]] = {part: [] for part in [*parts, "row added to session"]}
    timings["whole apply_async"] = []
    timings[KEY_UPSERT] = []
    for run_index in range(ctx.repeats):
        ctx.say(f"enqueue: parts, run {run_index + 1}/{ctx.repeats}")
        for part, call in parts.items():
            timings[part].append(_best_us(call))
        added, whole = _session_parts(ctx, tasks, name)
        timings["row added to session"].append(added)
        timings["whole apply_async"].append(whole)
        timings[KEY_UPSERT].append(_key_upsert_us(ctx))
    for part, values in timings.items():
        figures.append(
            Figure(SECTION, f"enqueue part: {part}", "µs/call", values, note=_note(part))
        )

    for rows in ctx.sizes.flush_rows:
        spent: dict[str, list[float]] = {UNIT_OF_WORK: [], ONE_INSERT: []}
        for run_index in range(ctx.repeats):
            ctx.say(f"enqueue: flush of {rows} rows, run {run_index + 1}/{ctx.repeats}")
            for variant in rotated(list(spent), run_index):
                spent[variant].append(_flush_us(ctx, variant, rows, ctx.sizes.flush_rounds))
        figures += [
            Figure(
                SECTION,
                f"flush of {rows} rows, ORM unit of work",
                "µs/flush",
                spent[UNIT_OF_WORK],
                note=f"median of {ctx.sizes.flush_rounds} transactions per run",
            ),
            Figure(
                SECTION,
                f"flush of {rows} rows, one INSERT (outbox.data.session_rows)",
                "µs/flush",
                spent[ONE_INSERT],
                note=f"median of {ctx.sizes.flush_rounds} transactions per run",
            ),
            Figure(
                SECTION,
                f"ratio one INSERT / unit of work, {rows} rows",
                RATIO,
                ratios(spent[ONE_INSERT], spent[UNIT_OF_WORK]),
            ),
        ]
    return figures


def _session_parts(ctx: Context, tasks: TaskOutbox, name: str) -> tuple[float, float]:
    """The row added to a session alone, and the whole call, per call, as a request
    makes them: ``PER_FLUSH`` calls into a session with nothing noted yet (the first one
    adds the stand-in the others share). Nothing is flushed; the session is emptied
    between groups, outside the timing."""
    with Session(ctx.engine) as session:
        row = _values(utcnow())
        added = _best_grouped_us(session, lambda: add_row(session, row))
        whole = _best_grouped_us(session, lambda: tasks.apply_async(name, (1,), session=session))
    return added, whole


def _best_grouped_us(session: Session, call: Callable[[], Any]) -> float:
    groups = CALLS // PER_FLUSH
    rounds = []
    for _ in range(ROUNDS):
        spent = 0
        for _ in range(groups):
            start = time.perf_counter_ns()
            for _ in range(PER_FLUSH):
                call()
            spent += time.perf_counter_ns() - start
            session.expunge_all()
            session.info.clear()
        rounds.append(spent / (groups * PER_FLUSH) / 1000)
    return min(rounds)


def _key_upsert_us(ctx: Context) -> float:
    """What an ordered enqueue adds: the statement that takes the key's next number, run
    again and again on one key inside one transaction (rolled back at the end)."""
    store = store_for(ctx.engine)
    with ctx.engine.connect() as conn:
        now = utcnow()
        store.next_in_line(conn, keys_table, "bench:1", now)
        spent = _best_us(lambda: store.next_in_line(conn, keys_table, "bench:1", now), UPSERTS)
        conn.rollback()
    return spent


def _best_us(call: Callable[[], Any], calls: int = CALLS) -> float:
    return min(timeit.repeat(call, number=calls, repeat=ROUNDS)) / calls * 1e6


def _note(part: str) -> str:
    if part == "whole apply_async":
        return f"the call, up to the row in the session: no SQL ({PER_FLUSH} per flush)"
    if part == "row added to session":
        return (
            f"its values noted for the flush; the first of {PER_FLUSH} also adds the "
            "OutboxMessage standing for them"
        )
    if part == KEY_UPSERT:
        return f"best of {ROUNDS} rounds of {UPSERTS} upserts of one key in one transaction"
    return ""


def _values(now: Any) -> dict[str, Any]:
    return {
        "task_id": uuid.uuid4(),
        "task_name": "tasks.orders.reserve_stock",
        "args": [1],
        "kwargs": {},
        "options": {},
        "status": OutboxStatus.PENDING,
        "attempts": 0,
        "created_at": now,
        "available_at": now,
    }


def _flush_us(ctx: Context, variant: str, rows: int, rounds: int) -> float:
    """The median time of adding ``rows`` rows and flushing them, in µs."""
    now = utcnow()
    times = []
    with Session(ctx.engine) as session:
        for _ in range(rounds):
            session.execute(text("SELECT 1"))
            start = time.perf_counter_ns()
            for _ in range(rows):
                if variant == ONE_INSERT:
                    add_row(session, _values(now))
                else:
                    session.add(OutboxMessage(**_values(now)))
            session.flush()
            times.append((time.perf_counter_ns() - start) / 1000)
            session.rollback()
    return median(times)
