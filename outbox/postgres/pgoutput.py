"""Decoding PostgreSQL's ``pgoutput`` logical replication messages (protocol version 1).

What a logical replication slot with the ``pgoutput`` plugin streams is a documented
binary format ("Logical Replication Message Formats" in PostgreSQL's manual): one
message per change, each a type byte and big-endian fields. Version 1 is what every
server since PostgreSQL 10 speaks; the outbox reads nothing that needs a later one
(streamed or two-phase transactions, binary column values).

No maintained Python decoder fits (the ones published are unmaintained or wrap a native
library for a whole replication client), and the format is small: this module decodes
each message into a frozen dataclass and keeps the relations a stream announced, so an
INSERT's tuple reads as ``{column: text}``. It does no I/O: the replication connection
hands it each message's bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from outbox.errors import PgoutputError

#: PostgreSQL's epoch: its timestamps count microseconds from here.
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class _Unchanged:
    """A TOASTed column the UPDATE did not change: the server did not send its value."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "Unchanged"


Unchanged = _Unchanged()

#: One row's values in the server's text format, by position: ``None`` for NULL,
#: ``Unchanged`` for a TOASTed value an UPDATE did not send.
TupleData = tuple[str | _Unchanged | None, ...]


@dataclass(frozen=True, slots=True)
class Begin:
    """A transaction starts; ``final_lsn`` is where its commit record ends up."""

    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """A transaction committed at ``commit_lsn``; ``end_lsn`` is just past its commit
    record: the position to confirm once everything in it is handled."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    """The transaction was replicated from another node named ``name``."""

    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    #: Part of the replica identity (the primary key, by default).
    key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    """The shape of a table, sent before its first change in a stream and again after
    it changes."""

    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class TypeMessage:
    """A data type's name, sent before a change that uses a non-built-in type."""

    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation_oid: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    relation_oid: int
    new: TupleData
    #: The old row's replica identity (``K``) or whole old row (``O``), when sent.
    old: TupleData | None = None
    old_kind: str | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    relation_oid: int
    old: TupleData
    old_kind: str


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """What ``pg_logical_emit_message`` wrote (with the ``messages`` option)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = (
    Begin
    | Commit
    | Origin
    | Relation
    | TypeMessage
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
)


class _Reader:
    """Big-endian fields off one message, refusing to read past its end."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if size < 0 or end > len(self.data):
            raise PgoutputError(
                f"message cut short: {size} bytes wanted at offset {self.pos} of {len(self.data)}"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def _unpack(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        value: int = struct.unpack(fmt, self.take(size))[0]
        return value

    def int8(self) -> int:
        return self._unpack(">b")

    def byte(self) -> str:
        return self.take(1).decode("ascii", errors="replace")

    def int16(self) -> int:
        return self._unpack(">h")

    def int32(self) -> int:
        return self._unpack(">i")

    def uint32(self) -> int:
        return self._unpack(">I")

    def int64(self) -> int:
        return self._unpack(">q")

    def uint64(self) -> int:
        return self._unpack(">Q")

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise PgoutputError(f"unterminated string at offset {self.pos}")
        value = self.data[self.pos : end].decode("utf-8")
        self.pos = end + 1
        return value

    def timestamp(self) -> datetime:
        return PG_EPOCH + timedelta(microseconds=self.int64())

    def tuple_data(self) -> TupleData:
        values: list[str | _Unchanged | None] = []
        for _ in range(self.int16()):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(Unchanged)
            elif kind == "t":
                values.append(self.take(self.int32()).decode("utf-8"))
            else:
                raise PgoutputError(
                    f"column value of kind {kind!r}: only text values (protocol version 1, "
                    "no 'binary' option) are decoded"
                )
        return tuple(values)

    def done(self, kind: str) -> None:
        if self.pos != len(self.data):
            raise PgoutputError(f"{len(self.data) - self.pos} bytes left after a {kind!r} message")


def decode(payload: bytes) -> Message:
    """One ``pgoutput`` message (protocol version 1, not streamed)."""
    if not payload:
        raise PgoutputError("empty message")
    reader = _Reader(payload)
    kind = reader.byte()
    message: Message
    if kind == "B":
        message = Begin(reader.uint64(), reader.timestamp(), reader.uint32())
    elif kind == "C":
        message = Commit(reader.int8(), reader.uint64(), reader.uint64(), reader.timestamp())
    elif kind == "O":
        message = Origin(reader.uint64(), reader.string())
    elif kind == "R":
        oid, namespace, name = reader.uint32(), reader.string(), reader.string()
        identity = reader.byte()
        columns = []
        for _ in range(reader.int16()):
            flags = reader.int8()
            columns.append(
                Column(reader.string(), reader.uint32(), reader.int32(), key=bool(flags & 1))
            )
        message = Relation(oid, namespace, name, identity, tuple(columns))
    elif kind == "Y":
        message = TypeMessage(reader.uint32(), reader.string(), reader.string())
    elif kind == "I":
        oid = reader.uint32()
        _expect(reader, "N", kind)
        message = Insert(oid, reader.tuple_data())
    elif kind == "U":
        oid = reader.uint32()
        marker = reader.byte()
        old = old_kind = None
        if marker in ("K", "O"):
            old_kind, old = marker, reader.tuple_data()
            marker = reader.byte()
        if marker != "N":
            raise PgoutputError(f"UPDATE: expected 'N' before the new tuple, got {marker!r}")
        message = Update(oid, reader.tuple_data(), old, old_kind)
    elif kind == "D":
        oid = reader.uint32()
        old_kind = reader.byte()
        if old_kind not in ("K", "O"):
            raise PgoutputError(f"DELETE: expected 'K' or 'O', got {old_kind!r}")
        message = Delete(oid, reader.tuple_data(), old_kind)
    elif kind == "T":
        count = reader.int32()
        options = reader.int8()
        oids = tuple(reader.uint32() for _ in range(count))
        message = Truncate(oids, cascade=bool(options & 1), restart_identity=bool(options & 2))
    elif kind == "M":
        flags = reader.int8()
        lsn = reader.uint64()
        prefix = reader.string()
        content = reader.take(reader.int32())
        message = LogicalMessage(bool(flags & 1), lsn, prefix, content)
    else:
        raise PgoutputError(
            f"message type {kind!r} is not one of pgoutput protocol version 1's "
            "(a streamed transaction needs version 2 and the 'streaming' option, which the "
            "outbox does not ask for)"
        )
    reader.done(kind)
    return message


def _expect(reader: _Reader, marker: str, kind: str) -> None:
    found = reader.byte()
    if found != marker:
        raise PgoutputError(f"{kind!r} message: expected {marker!r}, got {found!r}")


class Relations:
    """The relations a stream has announced, to read tuples by column name.

    The server sends a ``Relation`` message before the first change of a table in each
    stream (and again after its shape changes), so a consumer must feed every one here
    before it reads a change that refers to it.
    """

    def __init__(self) -> None:
        self._by_oid: dict[int, Relation] = {}

    def add(self, relation: Relation) -> None:
        self._by_oid[relation.oid] = relation

    def get(self, oid: int) -> Relation:
        try:
            return self._by_oid[oid]
        except KeyError:
            raise PgoutputError(
                f"a change refers to relation {oid}, which the stream has not described: "
                "every Relation message must be passed to Relations.add"
            ) from None

    def row(self, oid: int, values: TupleData) -> Mapping[str, str | _Unchanged | None]:
        """``values`` by column name."""
        relation = self.get(oid)
        if len(values) != len(relation.columns):
            raise PgoutputError(
                f"a tuple of {len(values)} values for {relation.namespace}.{relation.name}, "
                f"which has {len(relation.columns)} columns"
            )
        return {column.name: value for column, value in zip(relation.columns, values, strict=True)}


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` (how PostgreSQL writes a WAL position) as an integer."""
    high, _, low = text.partition("/")
    try:
        return (int(high, 16) << 32) + int(low, 16)
    except ValueError:
        raise ValueError(f"{text!r} is not a WAL position such as '16/B374D848'") from None


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
