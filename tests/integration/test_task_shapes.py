"""The task-shape matrix: each shape of task users write keeps the outbox's promises,
ordered and unordered, on Redis and on RabbitMQ, in an app that is not the example.

The app (``tests.shapes``) is plain SQLAlchemy and Celery, wired as a user wires the
outbox without Flask; its worker is a real ``celery worker`` with two processes. For each
shape two tasks are enqueued ("first", then "second"; under one ordering key when
ordered) and relayed, and then:

- each effect is applied exactly once (none for a task that ignores itself);
- an ordered key's effects are applied in commit order, and the key ends idle;
- no row is dead, and each ends in the state its last run reported.

A task past its hard time limit is killed with its process; the relay's maintenance then
publishes it again, after the time the defaults give it (the confirmation timeout, the
heartbeat of a worker process), which the test spends at once by running one pass with
its clock that much ahead, as soon as the worker has reported the kill.
"""

from __future__ import annotations

import os
import sys
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from celery import Celery
from celery.exceptions import CDeprecationWarning
from sqlalchemy import Engine, delete, select

from outbox import OutboxStatus, Relay, TaskOutbox, outbox_table
from outbox.data.schema import keys_table
from tests.conftest import RUN_ID
from tests.services import BROKERS, started_worker, wait_for
from tests.shapes.app import DEFAULT_QUEUE, OWN_QUEUE, ROUTED_QUEUE, effects_table, make_app

LABELS = ("first", "second")

#: Each shape, and the state its row ends in.
SHAPES = {
    "idempotent_acks_late": "SUCCESS",
    "idempotent_on_receipt": "SUCCESS",
    "plain": "SUCCESS",
    "routed_by_its_queue": "SUCCESS",
    "routed_by_task_routes": "SUCCESS",
    "retry": "SUCCESS",
    "autoretry": "SUCCESS",
    "reject_requeue": "SUCCESS",
    "replace": "SUCCESS",
    "ignore": "IGNORED",
    "soft_time_limit": "SUCCESS",
    "hard_time_limit": "SUCCESS",
}
#: Further ahead than any default the relay waits for: the confirmation timeout (1 h).
TIME_SPENT = timedelta(hours=1, minutes=5)


@dataclass
class Shapes:
    """The shapes app on one broker, with its worker."""

    broker: str
    app: Celery
    log: Path


def shapes_app(broker_url: str, database_url: str, counter_url: str) -> Celery:
    with warnings.catch_warnings():
        # Celery 5.5+ warns that queue= on a task goes away in Celery 6; users write it.
        warnings.simplefilter("ignore", CDeprecationWarning)
        app = make_app(broker_url, database_url, counter_url)
        app.finalize(auto=True)  # binds the tasks, which is when Celery warns
        return app


@pytest.fixture(scope="module", params=BROKERS)
def shapes(
    request: pytest.FixtureRequest,
    engine: Engine,
    redis_client: object,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Shapes]:
    """A worker of the shapes app on each broker in turn, consuming its three queues."""
    broker_url = (
        os.environ["CELERY_BROKER_URL"]
        if request.param == "redis"
        else request.getfixturevalue("rabbitmq_url")
    )
    database_url = engine.url.render_as_string(hide_password=False)
    counter_url = os.environ["CELERY_BROKER_URL"]
    effects_table.metadata.create_all(engine)
    app = shapes_app(broker_url, database_url, counter_url)
    node = f"shapes-{request.param}-{RUN_ID}@localhost"
    log = tmp_path_factory.mktemp(f"shapes-{request.param}") / "worker.log"
    env = {
        **os.environ,
        "CELERY_BROKER_URL": broker_url,
        "SHAPES_DATABASE_URL": database_url,
        "SHAPES_COUNTER_URL": counter_url,
    }
    command = [
        sys.executable, "-m", "celery", "-A", "tests.shapes.worker", "worker",
        "--queues", f"{DEFAULT_QUEUE},{OWN_QUEUE},{ROUTED_QUEUE}",
        "--concurrency", "2", "--loglevel", "INFO", "--hostname", node,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    try:
        with started_worker(
            command, log, env, lambda: app.control.ping(destination=[node], timeout=0.5)
        ):
            yield Shapes(request.param, app, log)
    finally:
        with engine.begin() as conn:
            conn.execute(delete(effects_table))


class Ahead:
    """Real time, ``TIME_SPENT`` ahead."""

    def __call__(self) -> datetime:
        return datetime.now(UTC) + TIME_SPENT


def effects(engine: Engine, task_ids: list[str]) -> list[tuple[str, str]]:
    """(task id, label) of each effect applied for ``task_ids``, in the order applied."""
    e = effects_table.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(e.task_id, e.label).where(e.task_id.in_(task_ids)).order_by(e.id)
        ).all()
    return [(row.task_id, row.label) for row in rows]


def rows(engine: Engine, task_ids: list[str]) -> list[tuple[str, str | None]]:
    t = outbox_table.c
    with engine.connect() as conn:
        found = conn.execute(
            select(t.status, t.task_state)
            .where(t.task_id.in_([uuid.UUID(task_id) for task_id in task_ids]))
            .order_by(t.id)
        ).all()
    return [(row.status, row.task_state) for row in found]


@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_task_shape_keeps_the_outbox_s_promises(
    engine: Engine, shapes: Shapes, shape: str, ordered: bool, request: pytest.FixtureRequest
) -> None:
    """Exactly once, in order, nothing dead, no key left waiting: for this shape."""
    key = f"shape:{uuid.uuid4().hex[:12]}" if ordered else None
    outbox = TaskOutbox(shapes.app)
    task_ids = []
    for label in LABELS:  # one transaction each: "second" commits after "first"
        with engine.begin() as conn:
            result = outbox.apply_async(f"shapes.{shape}", (label,), session=conn, ordering_key=key)
        task_ids.append(result.id)
    relay = Relay(engine, shapes.app)
    request.addfinalizer(relay.close)  # the AMQP publisher's connection is its own
    expected_effects = (
        [] if SHAPES[shape] == "IGNORED" else list(zip(task_ids, LABELS, strict=True))
    )
    expected_rows = [(OutboxStatus.DISPATCHED, SHAPES[shape])] * len(LABELS)
    #: Kills of each task the test has spent the defaults' time on.
    spent: dict[str, int] = {}
    #: What the last look saw, which a timeout reports.
    seen: dict[str, object] = {}

    def settled() -> bool:
        relay.drain()
        if shape == "hard_time_limit":
            log = shapes.log.read_text()
            for task_id in task_ids:
                kills = log.count(f"exceeded for shapes.{shape}[{task_id}]")
                if kills > spent.get(task_id, 0):
                    spent[task_id] = kills
                    with Relay(engine, shapes.app, clock=Ahead()) as ahead:
                        ahead.maintain()
                        # What it put back is due by its clock, not yet by the real one.
                        ahead.drain(maintain=False)
        seen.update(effects=effects(engine, task_ids), rows=rows(engine, task_ids))
        return (
            sorted(seen["effects"]) == sorted(expected_effects)  # type: ignore[call-overload]
            and seen["rows"] == expected_rows
        )

    try:
        wait_for(settled, timeout=60, interval=0.1)
    except pytest.fail.Exception:
        pytest.fail(f"not settled within 60 s: task ids {task_ids}, last seen {seen}")
    applied = effects(engine, task_ids)
    assert sorted(expected_effects) == sorted(applied), "each effect exactly once"
    if ordered:
        assert expected_effects == applied, "in commit order"
        with engine.connect() as conn:
            state = conn.execute(
                select(keys_table.c.head_seq, keys_table.c.blocked_at).where(
                    keys_table.c.key == key
                )
            ).one()
        assert (None, None) == tuple(state), "the key is idle, not blocked"
    assert expected_rows == rows(engine, task_ids), "no row dead, each in its final state"
