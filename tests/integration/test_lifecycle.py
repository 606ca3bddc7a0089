"""The worker records each outbox task's outcome on its row (real worker, PostgreSQL)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from celery import Celery
from flask import Flask
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from outbox import Relay, TaskOutbox, outbox_table
from tasks.orders import notify_customer
from tests.integration.test_delivery import make_order
from tests.services import wait_for

MISSING_ORDER = 2**31 - 2


def lifecycle(engine: Engine, task_id: str) -> dict[str, Any]:
    t = outbox_table.c
    with engine.connect() as conn:
        row = conn.execute(
            select(
                t.task_state, t.task_started_at, t.task_finished_at, t.task_error, t.task_runs
            ).where(t.task_id == uuid.UUID(task_id))
        ).one()
    return dict(row._mapping)


def test_success_and_failure_are_recorded_on_the_rows(
    app: Flask, engine: Engine, celery_app: Celery, worker: str
) -> None:
    order_id = make_order(engine)
    tasks = TaskOutbox(celery_app)
    with Session(engine) as session:
        ok = tasks.apply_async(notify_customer, args=(order_id,), session=session)
        failing = tasks.apply_async(notify_customer, args=(MISSING_ORDER,), session=session)
        session.commit()
    assert lifecycle(engine, ok.id)["task_state"] is None, "nothing is known before a run"

    assert 2 == Relay(engine, celery_app).drain().published
    done = wait_for(lambda: (r := lifecycle(engine, ok.id))["task_state"] and r, timeout=20)
    assert "SUCCESS" == done["task_state"]
    assert 1 == done["task_runs"]
    assert done["task_error"] is None
    assert done["task_started_at"] <= done["task_finished_at"]

    failed = wait_for(lambda: (r := lifecycle(engine, failing.id))["task_state"] and r, timeout=20)
    assert "FAILURE" == failed["task_state"]
    assert f"LookupError: order {MISSING_ORDER} does not exist" == failed["task_error"]
    assert 1 == failed["task_runs"]

    shown = app.test_cli_runner().invoke(args=["outbox", "inspect", failing.id, "--json"])
    assert 0 == shown.exit_code, shown.output
    details = json.loads(shown.output)
    assert (details["task_state"], details["task_runs"]) == ("FAILURE", 1)
    assert failed["task_error"] == details["task_error"]
