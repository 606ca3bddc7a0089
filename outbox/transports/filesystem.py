"""kombu's filesystem transport, with messages that appear whole: ``outbox-filesystem://``.

kombu's own ``filesystem://`` creates a message's file and writes it afterwards. A
consumer listing the folder in between takes the empty file, fails to decode it, and
Celery's worker stops with ``Unrecoverable error: JSONDecodeError``: a busy embedded
set-up loses its worker within seconds. This transport differs in two places and is
otherwise kombu's (same folders, same transport options, same file names, so its
processes and kombu's can share a folder):

- **Writing.** Each message is written under a name consumers skip, then renamed into
  the queue: a rename is atomic within a folder, so a consumer finds no file or a
  whole one.
- **Reading.** A consumer claims a file by renaming it within the folder (kombu moves
  it to the temporary folder, which may be another filesystem: copied while a writer
  still writes it), then reads it under a shared lock, which waits for a writer of
  kombu's that holds its exclusive one. A file that still does not decode, left by
  kombu's writer (a process without this transport, writing into the same folder), is
  put back for a later poll instead of killing the worker; one that stays undecodable
  for ``STALE_AFTER`` seconds (its writer died) is set aside under a name consumers
  skip and logged, never dropped silently.

Importing :mod:`outbox` registers the alias, so a URL of ``outbox-filesystem://``
resolves in any process that imported it (``celeryconfig`` of a worker, a web app).
kombu's own ``filesystem`` alias is left as it is.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

logger = logging.getLogger(__name__)

#: The URL scheme of this transport: ``outbox-filesystem://``.
FILESYSTEM_TRANSPORT = "outbox-filesystem"

#: Seconds a message file may stay undecodable before it counts as abandoned by its
#: writer rather than still being written.
STALE_AFTER = 60.0

#: Prefixes of the names consumers skip: kombu takes a file of queue ``q`` only if the
#: part of its name after the first dot is ``q.msg``, and these names start with a dot.
PARTIAL, CLAIMED, UNDECODABLE = ".partial-", ".claimed-", ".undecodable-"

#: The shared-lock flag kombu locks message files with on this platform (fcntl's on POSIX,
#: 0 on Windows): kombu imports it without exporting it.
_LOCK_SHARED: int = filesystem.LOCK_SH  # type: ignore[attr-defined]


class FilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel, writing each message whole and surviving a file
    another writer has not finished."""

    # kombu's filesystem channel calls the message `payload` where its base says
    # `message`; this keeps kombu's filesystem signature, as kombu's own stubs do.
    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]
        """Write the message under a name consumers skip, then rename it into place."""
        # kombu's own name, so kombu's consumers sharing the folder take it too.
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        folder = Path(self.data_folder_out)
        partial = folder / f"{PARTIAL}{uuid.uuid4()}"
        try:
            partial.write_bytes(str_to_bytes(dumps(payload)))
            os.replace(partial, folder / name)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise ChannelError(f"cannot add message {name!r} to folder {str(folder)!r}: {e}") from e

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        """The oldest whole message of ``queue``; files that do not decode are skipped."""
        suffix = f"{queue}.msg"
        folder = Path(self.data_folder_in)
        for name in sorted(os.listdir(folder)):
            if name.partition(".")[2] != suffix:
                continue
            claimed = folder / f"{CLAIMED}{name}"
            try:
                os.rename(folder / name, claimed)
            except OSError:  # another consumer took it first
                continue
            payload = self._read(claimed)
            try:
                message: dict[str, Any] = loads(bytes_to_str(payload))
            except ValueError:
                self._not_decoded(claimed, folder / name, payload)
                continue
            self._done(claimed, name)
            return message
        raise Empty()

    def _read(self, path: Path) -> bytes:
        try:
            with path.open("rb", buffering=0) as file:
                # kombu's writer holds an exclusive lock while it writes: wait for it.
                filesystem.lock(file, _LOCK_SHARED)
                try:
                    return file.read()
                finally:
                    filesystem.unlock(file)
        except OSError as e:
            raise ChannelError(f"cannot read message file {str(path)!r}: {e}") from e

    def _not_decoded(self, claimed: Path, original: Path, payload: bytes) -> None:
        """Put a file back for a later poll while its writer may still be writing it;
        set it aside once it is older than ``STALE_AFTER``."""
        age = time.time() - claimed.stat().st_mtime
        if age < STALE_AFTER:
            os.replace(claimed, original)
            return
        aside = original.with_name(f"{UNDECODABLE}{original.name}")
        os.replace(claimed, aside)
        logger.error(
            "message file %s did not decode as JSON for %.0f s (%d bytes: %r); set aside as %s",
            original,
            age,
            len(payload),
            payload[:80],
            aside,
        )

    def _done(self, claimed: Path, name: str) -> None:
        """Keep the file in ``processed_folder`` if ``store_processed``, as kombu does."""
        if self.store_processed:
            shutil.move(claimed, Path(self.processed_folder) / name)
        else:
            claimed.unlink()


class FilesystemTransport(filesystem.Transport):
    """kombu's filesystem transport with :class:`FilesystemChannel`; the relay and the probes
    treat it as the filesystem broker it is (``driver_type``)."""

    Channel = FilesystemChannel
    driver_type = "filesystem"
    driver_name = FILESYSTEM_TRANSPORT


TRANSPORT_ALIASES[FILESYSTEM_TRANSPORT] = f"{__name__}:FilesystemTransport"

__all__ = ["FILESYSTEM_TRANSPORT", "STALE_AFTER", "FilesystemChannel", "FilesystemTransport"]
