"""The pgoutput decoder reads every protocol-version-1 message as the manual lays it out.

An encoder written here from "Logical Replication Message Formats" (PostgreSQL's manual)
builds messages field by field; hypothesis round-trips random ones through the decoder.
Bytes a real server sent are decoded in ``tests/integration/test_pgoutput_server.py``.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox.errors import PgoutputError
from outbox.postgres.pgoutput import (
    PG_EPOCH,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    Relation,
    Relations,
    Truncate,
    TupleData,
    TypeMessage,
    Unchanged,
    Update,
    decode,
    format_lsn,
    parse_lsn,
)


def _string(value: str) -> bytes:
    return value.encode() + b"\0"


def _time(value: datetime) -> bytes:
    delta = value - PG_EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return struct.pack(">q", micros)


def _tuple(values: TupleData) -> bytes:
    out = struct.pack(">h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is Unchanged:
            out += b"u"
        else:
            assert isinstance(value, str)
            data = value.encode()
            out += b"t" + struct.pack(">i", len(data)) + data
    return out


def encode(message: Message) -> bytes:
    """``message`` as a server sends it (protocol version 1)."""
    match message:
        case Begin(final_lsn, commit_time, xid):
            return b"B" + struct.pack(">Q", final_lsn) + _time(commit_time) + struct.pack(">I", xid)
        case Commit(flags, commit_lsn, end_lsn, commit_time):
            return b"C" + struct.pack(">bQQ", flags, commit_lsn, end_lsn) + _time(commit_time)
        case Origin(commit_lsn, name):
            return b"O" + struct.pack(">Q", commit_lsn) + _string(name)
        case Relation(oid, namespace, name, identity, columns):
            out = b"R" + struct.pack(">I", oid) + _string(namespace) + _string(name)
            out += identity.encode() + struct.pack(">h", len(columns))
            for column in columns:
                out += struct.pack(">b", int(column.key)) + _string(column.name)
                out += struct.pack(">Ii", column.type_oid, column.type_modifier)
            return out
        case TypeMessage(oid, namespace, name):
            return b"Y" + struct.pack(">I", oid) + _string(namespace) + _string(name)
        case Insert(oid, new):
            return b"I" + struct.pack(">I", oid) + b"N" + _tuple(new)
        case Update(oid, new, old, old_kind):
            out = b"U" + struct.pack(">I", oid)
            if old is not None:
                assert old_kind is not None
                out += old_kind.encode() + _tuple(old)
            return out + b"N" + _tuple(new)
        case Delete(oid, old, old_kind):
            return b"D" + struct.pack(">I", oid) + old_kind.encode() + _tuple(old)
        case Truncate(oids, cascade, restart_identity):
            options = int(cascade) | (2 * int(restart_identity))
            return (
                b"T" + struct.pack(">ib", len(oids), options) + struct.pack(f">{len(oids)}I", *oids)
            )
        case LogicalMessage(transactional, lsn, prefix, content):
            out = b"M" + struct.pack(">bQ", int(transactional), lsn) + _string(prefix)
            return out + struct.pack(">i", len(content)) + content
    raise AssertionError(f"no encoding for {message!r}")


uint32 = st.integers(0, 2**32 - 1)
lsns = st.integers(0, 2**64 - 1)
# hypothesis takes naive bounds and adds the time zone itself.
times = st.datetimes(
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001
    max_value=datetime(2200, 1, 1),  # noqa: DTZ001
    timezones=st.just(UTC),
)
names = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=20)
values = st.one_of(st.none(), st.just(Unchanged), st.text(max_size=40))
tuples = st.lists(values, max_size=12).map(tuple)
columns = st.builds(Column, names, uint32, st.integers(-1, 2**31 - 1), st.booleans())
messages = st.one_of(
    st.builds(Begin, lsns, times, uint32),
    st.builds(Commit, st.just(0), lsns, lsns, times),
    st.builds(Origin, lsns, names),
    st.builds(
        Relation, uint32, names, names, st.sampled_from("dnfi"), st.lists(columns).map(tuple)
    ),
    st.builds(TypeMessage, uint32, names, names),
    st.builds(Insert, uint32, tuples),
    st.one_of(
        st.builds(Update, uint32, tuples),
        st.builds(Update, uint32, tuples, tuples, st.sampled_from("KO")),
    ),
    st.builds(Delete, uint32, tuples, st.sampled_from("KO")),
    st.builds(Truncate, st.lists(uint32, max_size=5).map(tuple), st.booleans(), st.booleans()),
    st.builds(LogicalMessage, st.booleans(), lsns, names, st.binary(max_size=50)),
)


@given(messages)
def test_every_message_decodes_to_what_was_encoded(message: Message) -> None:
    """Every field of every version-1 message survives the trip, whatever its values."""
    assert message == decode(encode(message))


@given(messages, st.data())
def test_a_message_cut_short_is_refused(message: Message, data: st.DataObject) -> None:
    """Bytes missing anywhere are an error, never a message with fields made up."""
    payload = encode(message)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(PgoutputError):
        decode(payload[:cut])


def test_bytes_left_over_are_refused() -> None:
    payload = encode(Insert(16384, ("1", None)))
    with pytest.raises(PgoutputError, match="1 bytes left after a 'I' message"):
        decode(payload + b"x")


def test_a_streamed_transaction_is_refused_with_the_reason() -> None:
    """Version 2's streaming messages are not asked for: one arriving says so."""
    with pytest.raises(PgoutputError, match="streamed transaction needs version 2"):
        decode(b"S" + struct.pack(">Ib", 7, 1))


def test_binary_column_values_are_refused() -> None:
    payload = b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"b"
    payload += struct.pack(">i", 1) + b"\x01"
    with pytest.raises(PgoutputError, match="only text values"):
        decode(payload)


def test_commit_times_count_microseconds_from_2000() -> None:
    """PostgreSQL's epoch is 2000-01-01 UTC, not 1970."""
    payload = b"B" + struct.pack(">QqI", 0x16B374D848, 1_000_001, 42)
    begin = decode(payload)
    assert Begin(0x16B374D848, PG_EPOCH + timedelta(seconds=1, microseconds=1), 42) == begin


def test_a_tuple_reads_by_the_columns_its_relation_announced() -> None:
    relations = Relations()
    relations.add(
        Relation(
            16384,
            "public",
            "celery_outbox",
            "d",
            (Column("id", 20, -1, key=True), Column("status", 1043, 20, key=False)),
        )
    )
    assert {"id": "7", "status": "pending"} == relations.row(16384, ("7", "pending"))
    with pytest.raises(PgoutputError, match="2 columns"):
        relations.row(16384, ("7",))
    with pytest.raises(PgoutputError, match="relation 99, which the stream has not described"):
        relations.row(99, ())


def test_a_later_relation_message_replaces_the_shape() -> None:
    """After an ALTER TABLE the server sends the relation again, before its next change."""
    relations = Relations()
    relations.add(Relation(1, "public", "t", "d", (Column("a", 23, -1, key=True),)))
    relations.add(
        Relation(1, "public", "t", "d", (Column("a", 23, -1, True), Column("b", 25, -1, False)))
    )
    assert {"a": "1", "b": None} == relations.row(1, ("1", None))


@given(lsns)
def test_wal_positions_read_as_postgresql_writes_them(lsn: int) -> None:
    assert lsn == parse_lsn(format_lsn(lsn))


def test_a_wal_position_in_another_form_is_refused() -> None:
    assert 0x16B374D848 == parse_lsn("16/B374D848")
    with pytest.raises(ValueError, match="'nonsense' is not a WAL position"):
        parse_lsn("nonsense")
