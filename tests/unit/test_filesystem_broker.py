"""``outbox-filesystem://``: kombu's filesystem transport, with messages that appear whole
and consumers that survive a file another writer has not finished."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection, Queue
from kombu.transport import TRANSPORT_ALIASES

from outbox import FILESYSTEM_TRANSPORT, FilesystemTransport
from outbox.transports.filesystem import STALE_AFTER

QUEUE = Queue("orders", routing_key="orders")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "control").mkdir()
    return tmp_path


def options(folder: Path, **more: object) -> dict[str, object]:
    return {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(folder / "control"),
        **more,
    }


@pytest.fixture
def connection(folder: Path) -> Iterator[Connection]:
    with Connection(f"{FILESYSTEM_TRANSPORT}://", transport_options=options(folder)) as conn:
        yield conn


def messages(folder: Path) -> list[str]:
    """The queue's message files: those kombu's consumer would take."""
    return sorted(
        name for name in os.listdir(folder) if name.partition(".")[2] == f"{QUEUE.name}.msg"
    )


def a_half_written_file(folder: Path) -> Path:
    """What kombu's own writer leaves between creating a message file and writing it."""
    path = folder / f"{round(time.monotonic() * 1000)}_0.{QUEUE.name}.msg"
    path.touch()
    return path


def test_the_alias_resolves_in_any_process_that_imported_outbox() -> None:
    """A fresh interpreter that only imported outbox opens outbox-filesystem://; kombu's
    own filesystem alias is left as kombu has it."""
    check = (
        "import outbox, kombu; "
        "print(type(kombu.Connection('outbox-filesystem://').transport).__qualname__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60
    )
    assert "FilesystemTransport" == result.stdout.strip()
    assert "kombu.transport.filesystem:Transport" == TRANSPORT_ALIASES["filesystem"]
    assert "filesystem" == FilesystemTransport.driver_type


def test_a_message_is_written_whole_under_kombus_name(connection: Connection, folder: Path) -> None:
    """Published messages are files kombu's own consumer takes; nothing else is left."""
    queue = connection.SimpleQueue(QUEUE)
    queue.put({"n": 1})
    assert [f".{QUEUE.name}.msg"] == [name[name.index(".") :] for name in messages(folder)]
    assert {"control", *messages(folder)} == set(os.listdir(folder)), "no partial file left"
    with Connection("filesystem://", transport_options=options(folder)) as plain:
        assert {"n": 1} == plain.SimpleQueue(QUEUE).get(timeout=1).payload


def message_file(scratch: Path, payload: object) -> bytes:
    """The bytes of a message file holding ``payload``, as a publisher writes it."""
    (scratch / "control").mkdir(parents=True)
    with Connection(f"{FILESYSTEM_TRANSPORT}://", transport_options=options(scratch)) as conn:
        conn.SimpleQueue(QUEUE).put(payload)
    [name] = messages(scratch)
    return (scratch / name).read_bytes()


def test_a_consumer_skips_a_half_written_file_and_takes_it_once_written(
    connection: Connection, folder: Path
) -> None:
    """An empty file (kombu's writer, mid-write) is put back, not decoded into a crash;
    the whole messages behind it are taken, and it is taken once its writer is done."""
    half = a_half_written_file(folder)
    queue = connection.SimpleQueue(QUEUE)
    queue.put({"n": 2})
    assert {"n": 2} == queue.get(timeout=1).payload
    assert [half.name] == messages(folder), "put back under its own name"
    half.write_bytes(message_file(folder / "scratch", "late"))
    assert "late" == queue.get(timeout=1).payload
    assert [] == messages(folder)


def test_plain_kombu_dies_on_the_same_file(folder: Path) -> None:
    """What the worker's ``Unrecoverable error: JSONDecodeError`` comes from: kombu's own
    consumer decodes the empty file (kept, so the fix above is known to be needed)."""
    a_half_written_file(folder)
    with (
        Connection("filesystem://", transport_options=options(folder)) as plain,
        pytest.raises(ValueError, match="Expecting value"),
    ):
        plain.SimpleQueue(QUEUE).get(timeout=1)


def test_a_file_that_never_decodes_is_set_aside_and_logged(
    connection: Connection, folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer that died mid-write leaves a file that never decodes: after STALE_AFTER
    it is moved out of the queue under a name consumers skip, with an error naming it."""
    half = a_half_written_file(folder)
    half.write_bytes(b'{"body": "trunc')
    old = time.time() - STALE_AFTER - 1
    os.utime(half, (old, old))
    queue = connection.SimpleQueue(QUEUE)
    with (
        caplog.at_level(logging.ERROR, logger="outbox.transports.filesystem"),
        pytest.raises(queue.Empty),
    ):
        queue.get(timeout=0.05)
    assert [] == messages(folder)
    assert (folder / f".undecodable-{half.name}").read_bytes() == b'{"body": "trunc'
    assert half.name in caplog.text


def test_store_processed_keeps_the_files_as_kombu_does(folder: Path) -> None:
    """With ``store_processed`` each consumed message is kept in ``processed_folder``."""
    processed = folder / "processed"
    processed.mkdir()
    settings = options(folder, store_processed=True, processed_folder=str(processed))
    with Connection(f"{FILESYSTEM_TRANSPORT}://", transport_options=settings) as conn:
        queue = conn.SimpleQueue(QUEUE)
        queue.put({"n": 3})
        [name] = messages(folder)
        assert {"n": 3} == queue.get(timeout=1).payload
    assert [name] == os.listdir(processed)
