"""Commit-to-publish latency with many writers: 2,000 enqueues/s from 16 of them.

One process cannot offer that load in Python on this machine, so the writers are
``pgbench`` clients at a fixed total rate (``-R``), each transaction one INSERT of a
pending outbox row, as in the ``wakeup`` section. pgbench logs each transaction's end,
right after its COMMIT returned (``-l``); a watcher process pops the messages off the
Redis queue as they land, on the same wall clock. The example's ``flask --app webapp
outbox relay`` publishes them, waking on NOTIFY while it waits and standing down while
it is busy (``outbox.postgres.wakeups``).

Each row's argument is its pgbench client, and a client's transactions run one after
another, so the k-th row of a client (by id) is the k-th transaction of its log: that
joins each commit to its task id.

Where the time goes: py-spy samples the relay process's main thread while pgbench runs,
idle moments included (a thread waiting on a socket is waiting for the database, the
broker or a wake-up), and each sample is put in the phase of the relay it was taken in.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text

from bench.children import Child, example_relay, watching
from bench.context import Context, rotated
from bench.data import empty_queue, empty_tables
from bench.pgbench import Pgbench
from bench.results import Figure, percentile

SECTION = "fanin"

_ROWS = text("SELECT task_id, args->>0 AS client FROM celery_outbox ORDER BY id")


def run(ctx: Context) -> list[Figure]:
    # Each transaction: a pending row whose argument is the client.
    pgbench = Pgbench(ctx, SECTION, args="jsonb_build_array(:client_id)")
    sizes = ctx.sizes
    writers, rate = sizes.fanin_writers, sizes.fanin_rate
    per_writer = max(1, round(rate * sizes.fanin_seconds / writers))
    variants = [f"{count} relay{'s' if count > 1 else ''}" for count in sizes.fanin_relays]
    p50: dict[str, list[float]] = {variant: [] for variant in variants}
    p99: dict[str, list[float]] = {variant: [] for variant in variants}
    published: dict[str, list[float]] = {variant: [] for variant in variants}
    achieved: list[float] = []
    samples: dict[str, list[list[float]]] = {variant: [] for variant in variants}
    shares: dict[str, list[float]] = {phase: [] for phase, _ in PHASES}
    for run_index in range(ctx.repeats):
        for variant in rotated(variants, run_index):
            count = sizes.fanin_relays[variants.index(variant)]
            ctx.say(
                f"fanin: run {run_index + 1}/{ctx.repeats}, {writers} writers at {rate:g}/s, "
                f"{variant}"
            )
            empty_tables(ctx.engine)
            empty_queue(ctx.redis)
            relays: list[Child] = []
            try:
                for number in range(count):
                    relays.append(
                        example_relay(
                            f"relay-fanin-{number}", ctx.services.work_dir, waiting_in=ctx.engine
                        )
                    )
                profile = ctx.services.work_dir / f"fanin-relay-{run_index}.txt"
                sampled = count == 1
                with _sampling(relays[0], profile, per_writer * writers / rate, sampled):
                    run = _measure(ctx, pgbench, writers, rate, per_writer)
            finally:
                for relay in relays:
                    relay.stop()
            if sampled:
                for phase, share in _phase_shares(profile).items():
                    shares[phase].append(share)
            p50[variant].append(percentile(run.latencies, 50))
            p99[variant].append(percentile(run.latencies, 99))
            published[variant].append(run.published)
            achieved.append(run.committed)
            samples[variant].append(run.latencies)
    load = (
        f"{writers} pgbench writers, {rate:g} enqueues/s offered "
        f"({min(achieved):.0f}-{max(achieved):.0f} achieved), {per_writer * writers:,} per run"
    )
    figures: list[Figure] = []
    for variant in variants:
        figures += [
            Figure(
                SECTION,
                f"{variant} at {rate:g}/s from {writers} writers: p50",
                "ms",
                p50[variant],
                note=f"flask outbox relay; {load}",
                samples=samples[variant],
            ),
            Figure(SECTION, f"{variant}: p99", "ms", p99[variant]),
            Figure(
                SECTION,
                f"{variant}: published",
                "tasks/s",
                published[variant],
                note="the run's tasks over the time from the first commit to the last arrival",
            ),
        ]
    figures += [
        Figure(
            SECTION,
            f"one relay's wall time: {phase}",
            "%",
            values,
            note="py-spy samples of the relay's main thread while pgbench ran",
        )
        for phase, values in shares.items()
    ]
    return figures


@dataclass(frozen=True, slots=True)
class _Run:
    #: Commit → arrival of every task, ms.
    latencies: list[float]
    #: Commits per second pgbench achieved, and tasks per second reaching the queue.
    committed: float
    published: float


def _measure(ctx: Context, pgbench: Pgbench, writers: int, rate: float, per_writer: int) -> _Run:
    """One run of pgbench, the relays already waiting."""
    count = writers * per_writer
    logs = ctx.services.work_dir / "fanin-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    with watching(ctx.services.work_dir, count, count / rate + 60, wall_clock=True) as watcher:
        watcher.go()
        options = [
            "-R",
            f"{rate:g}",
            "-t",
            str(per_writer),
            "-l",
            "--log-prefix",
            str(logs / "log"),
        ]
        pgbench.run(writers, options, count / rate + 120)
        arrivals = watcher.arrivals()
    commits = _commits(logs)
    with ctx.engine.connect() as conn:
        by_client: dict[int, list[str]] = defaultdict(list)
        for task_id, client in conn.execute(_ROWS):
            by_client[int(client)].append(str(task_id))
    latencies = []
    for client, task_ids in by_client.items():
        ends = commits.get(client, [])
        if len(ends) != len(task_ids):
            raise RuntimeError(
                f"client {client}: {len(task_ids)} rows but {len(ends)} logged transactions"
            )
        for task_id, committed in zip(task_ids, ends, strict=True):
            if task_id not in arrivals:
                raise RuntimeError(f"task {task_id} never reached the queue")
            latencies.append((arrivals[task_id] - committed) * 1000)
    every_end = [end for ends in commits.values() for end in ends]
    first, last = min(every_end), max(every_end)
    return _Run(
        latencies,
        committed=len(every_end) / (last - first),
        published=len(every_end) / (max(arrivals.values()) - first),
    )


#: The relay's phases, by the first of these functions a sample's stack passes through
#: from its root; a sample in none of them counts in the whole, in no phase.
PHASES = (
    ("claim (SELECT … FOR UPDATE SKIP LOCKED)", "_claim"),
    ("publish (messages built, Redis pipeline)", "publish"),
    ("mark dispatched (UPDATE)", "mark_dispatched"),
    ("transaction begin and commit, the rest of a batch", "run_once"),
    ("wait for work (NOTIFY, or due-row checks while stood down)", "wait"),
)
#: The relay loop's own frame, whatever the path py-spy prints for its file.
_LOOP_FUNCTION, _LOOP_FILE = "_loop", "relays/loop.py"


@contextmanager
def _sampling(relay: Child, output: Path, seconds: float, sampled: bool) -> Iterator[None]:
    """py-spy recording ``relay`` for ``seconds`` while the block runs (if ``sampled``)."""
    if not sampled:
        yield
        return
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        raise RuntimeError("the fanin section needs py-spy (pip install 'celery-outbox[dev]')")
    args = [str(spy), "record", "--pid", str(relay.popen.pid), "--format", "raw"]
    args += ["--idle", "--threads", "--nonblocking", "--rate", "500"]
    args += ["--duration", str(max(1, round(seconds))), "--output", str(output)]
    recorder = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield
    finally:
        _, errors = recorder.communicate(timeout=seconds + 60)
    if recorder.returncode != 0 or not output.exists():
        raise RuntimeError(f"py-spy exited with {recorder.returncode}: {errors[-2000:]}")


def _phase_shares(profile: Path) -> dict[str, float]:
    """Each phase's share (%) of the samples of the relay loop's thread."""
    counts = dict.fromkeys((phase for phase, _ in PHASES), 0)
    total = 0
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not any(f".{_LOOP_FUNCTION} (" in frame and _LOOP_FILE in frame for frame in frames):
            continue  # another thread: maintenance, heartbeat
        # "Class.method (path:line)": the method's name.
        names = [frame.split(" (", 1)[0].rsplit(".", 1)[-1] for frame in frames]
        phase = next((phase for phase, function in PHASES if function in names), None)
        if phase is not None:
            counts[phase] += int(count)
        total += int(count)
    if not total:
        raise RuntimeError(f"py-spy saw no sample of the relay loop ({profile})")
    return {phase: 100 * count / total for phase, count in counts.items()}


def _commits(logs: Path) -> dict[int, list[float]]:
    """Each client's transaction ends (Unix time), in its order, from pgbench's logs:
    ``client_id transaction_no time script_no time_epoch time_us [schedule_lag]``."""
    ends: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for log in logs.iterdir():
        for line in log.read_text().splitlines():
            fields = line.split()
            client, number = int(fields[0]), int(fields[1])
            ends[client].append((number, int(fields[4]) + int(fields[5]) / 1_000_000))
    return {client: [end for _, end in sorted(found)] for client, found in ends.items()}
