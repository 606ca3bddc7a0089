"""Arguments are validated with Celery's JSON serializer and round-trip unchanged."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox import ArgumentNotSerializableError
from outbox.serialization import from_wire, to_wire

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@given(st.lists(json_values, max_size=5), st.dictionaries(st.text(max_size=10), json_values))
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


@pytest.mark.parametrize(
    ("value", "culprit"),
    [
        ([1, {2, 3}], "args[1]={2, 3} (set)"),
        ([{"order": object}], "args[0]['order']=<class 'object'>"),
        ([float("nan")], "args[0]=nan"),
        ([[1, float("inf")]], "args[0][1]=inf"),
    ],
)
def test_unserializable_argument_is_named_in_the_error(value: list[Any], culprit: str) -> None:
    """The error points at the exact argument that cannot be serialized."""
    with pytest.raises(ArgumentNotSerializableError) as raised:
        to_wire(value, where="args")
    assert culprit in str(raised.value)


@given(st.sampled_from([{1, 2}, object(), float("nan"), complex(1, 2)]))
def test_values_celery_cannot_publish_are_refused(value: Any) -> None:
    """Anything outside Celery's JSON serializer is refused, never stored."""
    with pytest.raises(ArgumentNotSerializableError):
        to_wire([value], where="args")
