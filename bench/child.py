"""What runs inside the benchmark's child processes: ``python -m bench.child MODE``.

Modes:

- ``relay``: drain the outbox with :meth:`outbox.Relay.drain` until nothing is left;
- ``plain``: publish N tasks with ``task.apply_async(args=..., task_id=...)`` in a loop,
  the way an application without the outbox publishes;
- ``sweep``: run ``Relay.drain()`` every ``--interval`` seconds until SIGTERM, which is
  what the beat-scheduled ``outbox.sweep`` task does in a worker;
- ``loop``: a :class:`~outbox.relays.loop.RelayLoop` until SIGTERM, as ``flask outbox
  relay`` runs one, but with :mod:`bench.celery_app`'s ``bench.count`` registered;
- ``watch``: pop ``--count`` raw messages off a Redis queue as they arrive and report
  when each task id arrived (a process of its own, so that no other thread holds the GIL
  when a message lands).

``relay`` and ``plain`` speak a line protocol on stdin/stdout: they import and connect
first, print ``ready``, wait for ``go`` (so that start-up is not measured and two
relays start together), do their work and print one JSON line with what they did and
when (:func:`bench.children.monotonic`, comparable across processes). ``sweep`` prints
``ready`` and runs until stopped; ``loop`` prints ``ready`` once it waits for commits
(LISTENing) and runs until stopped; ``watch`` prints ``ready``, waits for ``go``, then
prints its JSON line once it has seen ``--count`` messages or ``--seconds`` have passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, text

from bench.children import monotonic
from outbox import OutboxSettings, Relay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.child")
    modes = parser.add_subparsers(dest="mode", required=True)
    relay_mode = modes.add_parser("relay")
    relay_mode.add_argument("--batch-size", type=int, default=OutboxSettings().batch_size)
    plain_mode = modes.add_parser("plain")
    plain_mode.add_argument("--count", type=int, required=True)
    plain_mode.add_argument("--task", default="orders.notify_customer")
    for mode in (relay_mode, plain_mode):
        mode.add_argument(
            "--no-events",
            action="store_true",
            help="publish without task-sent events (task_send_sent_event=False)",
        )
    sweep_mode = modes.add_parser("sweep")
    sweep_mode.add_argument("--interval", type=float, default=OutboxSettings().sweep_interval)
    modes.add_parser("loop")
    watch_mode = modes.add_parser("watch")
    watch_mode.add_argument("--queue", default="celery")
    watch_mode.add_argument("--count", type=int, required=True)
    watch_mode.add_argument("--seconds", type=float, required=True)
    watch_mode.add_argument(
        "--wall-clock",
        action="store_true",
        help="note arrivals on the wall clock (Unix time), as pgbench logs its commits",
    )
    args = parser.parse_args(argv)
    if args.mode == "watch":
        clock = time.time if args.wall_clock else monotonic
        print(json.dumps(_watch(args.queue, args.count, args.seconds, clock)), flush=True)
        return 0

    from bench.celery_app import app as celery_app
    from bench.celery_app import result_subscriptions

    if getattr(args, "no_events", False):
        celery_app.conf.task_send_sent_event = False

    # Like a worker and the relay command: this process never waits for results, so
    # Celery must not subscribe it to every published task's result channel.
    with result_subscriptions(False):
        engine = create_engine(os.environ["DATABASE_URL"])
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        with celery_app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=3)

        if args.mode == "relay":
            with Relay(engine, celery_app, OutboxSettings(batch_size=args.batch_size)) as relay:
                outcome = _drain(relay)
        elif args.mode == "plain":
            outcome = _publish(celery_app.tasks[args.task], args.count)
        elif args.mode == "loop":
            _loop(Relay(engine, celery_app, OutboxSettings()))
            return 0
        else:
            _sweep(Relay(engine, celery_app), args.interval)
            return 0
    print(json.dumps(outcome), flush=True)
    return 0


def _ready() -> None:
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("expected 'go' on stdin")


def _drain(relay: Relay) -> dict[str, Any]:
    """Drain until a drain finds nothing: with another relay at work, one drain can end
    early on a short batch (the other holds the rest), and the next takes what is left."""
    _ready()
    published = batches = 0
    start = monotonic()
    while True:
        result = relay.drain(max_seconds=3600)
        batches += result.batches
        published += result.published
        if result.broker_unavailable:
            raise SystemExit("the broker became unavailable during the drain")
        if not result.published:
            break
    return {"published": published, "batches": batches, "start": start, "end": monotonic()}


def _publish(task: Any, count: int) -> dict[str, Any]:
    """The loop an application runs without the outbox; ids and args made beforehand."""
    task_ids = [str(uuid.uuid4()) for _ in range(count)]
    _ready()
    start = monotonic()
    for number, task_id in enumerate(task_ids):
        task.apply_async(args=(number,), task_id=task_id)
    return {"published": count, "start": start, "end": monotonic()}


def _watch(
    queue: str, count: int, seconds: float, clock: Callable[[], float] = monotonic
) -> dict[str, Any]:
    """Pop messages as they arrive: BRPOP wakes the moment kombu's LPUSH lands, and the
    messages already behind it (a relay publishes a batch in one pipeline) are taken in
    the same instant with one RPOP, so they share its arrival time."""
    import redis

    client = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    client.ping()
    popped: list[tuple[float, bytes]] = []
    _ready()
    deadline = monotonic() + seconds
    while len(popped) < count and monotonic() < deadline:
        first = client.brpop([queue], timeout=0.1)
        if first is None:
            continue
        arrived = clock()
        rest = client.rpop(queue, count) or []
        popped.extend((arrived, raw) for raw in [first[1], *rest])
    arrivals = {json.loads(raw)["headers"]["id"]: arrived for arrived, raw in popped}
    return {"arrivals": arrivals}


def _sweep(relay: Relay, interval: float) -> None:
    """Drain at fixed ticks, as beat schedules the sweep (not an interval after each end).

    A drain that overruns its tick skips the ticks it missed, as an expired queued sweep
    would be skipped.
    """
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stopping.set())
    print("ready", flush=True)
    start = monotonic()
    tick = 0
    while not stopping.is_set():
        relay.drain()
        tick = max(tick + 1, math.ceil((monotonic() - start) / interval))
        stopping.wait(max(0.0, start + tick * interval - monotonic()))


def _loop(relay: Relay) -> None:
    """The relay loop, woken by NOTIFY, until SIGTERM (which lets it finish the batch in
    hand): a key's next task becomes pending only once the one before it has finished,
    so a relay that drained once and exited would not do."""
    from outbox.relays.loop import RelayLoop

    loop = RelayLoop(relay)

    def stop(_signum: int, _frame: Any) -> None:
        threading.Thread(target=loop.stop, name="relay-stop").start()

    signal.signal(signal.SIGTERM, stop)
    loop.run(on_ready=lambda _how: print("ready", flush=True))


if __name__ == "__main__":
    raise SystemExit(main())
