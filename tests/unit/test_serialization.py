"""Arguments are validated with Celery's JSON serializer and round-trip unchanged."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kombu.utils.json import dumps as kombu_dumps

from outbox import ArgumentNotSerializableError
from outbox.enqueue.serialization import encode, from_wire, to_wire

#: Text PostgreSQL's JSONB can store: no NUL, no lone surrogates (both refused at enqueue).
storable_text = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | storable_text,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(storable_text, children, max_size=5)
    ),
    max_leaves=20,
)


@given(st.lists(json_values, max_size=5), st.dictionaries(storable_text, json_values))
def test_json_arguments_round_trip_unchanged(args: list[Any], kwargs: dict[str, Any]) -> None:
    """Any JSON-typed args and kwargs come back from storage exactly as given."""
    assert args == from_wire(to_wire(args, where="args"))
    assert kwargs == from_wire(to_wire(kwargs, where="kwargs"))


@given(
    st.datetimes(timezones=st.just(UTC)),
    st.uuids(),
    st.decimals(allow_nan=False, allow_infinity=False),
)
def test_kombu_json_types_round_trip(moment: datetime, ident: uuid.UUID, amount: Decimal) -> None:
    """datetime, UUID and Decimal survive storage as kombu's JSON encodes them."""
    args = [moment, ident, amount]
    assert args == from_wire(to_wire(args, where="args"))


@given(
    st.lists(
        json_values
        | st.datetimes(timezones=st.just(UTC))
        | st.uuids()
        | st.binary(max_size=8).filter(lambda data: b"\x00" not in data),
        max_size=5,
    )
)
def test_what_is_stored_is_what_celery_would_publish(args: list[Any]) -> None:
    """Plain JSON takes a faster encoder than kombu's tagged types: either way the
    stored value and its counted size are those of the text kombu writes."""
    text = kombu_dumps(args)
    assert (json.loads(text), len(text.encode())) == encode(args, where="args")


@pytest.mark.parametrize(
    ("value", "culprit"),
    [
        ([1, {2, 3}], "args[1]={2, 3} (set)"),
        ([{"order": object}], "args[0]['order']=<class 'object'>"),
        ([float("nan")], "args[0]=nan"),
        ([[1, float("inf")]], "args[0][1]=inf"),
        (["ok", "a\x00b"], "args[1]='a\\x00b'"),
        ([{"k": "\ud800"}], "args[0]['k']='\\ud800'"),
        ([{"a\x00": 1}], "args[0] key='a\\x00'"),
    ],
)
def test_unserializable_argument_is_named_in_the_error(value: list[Any], culprit: str) -> None:
    """The error points at the exact argument that cannot be serialized."""
    with pytest.raises(ArgumentNotSerializableError) as raised:
        to_wire(value, where="args")
    assert culprit in str(raised.value)


@given(st.sampled_from([{1, 2}, object(), float("nan"), complex(1, 2), "\x00", "\udfff"]))
def test_values_celery_cannot_publish_are_refused(value: Any) -> None:
    """Anything outside Celery's JSON serializer is refused, never stored."""
    with pytest.raises(ArgumentNotSerializableError):
        to_wire([value], where="args")
