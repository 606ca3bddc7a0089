"""Arguments are checked with the exact serializer Celery will use to publish them.

Storing the serialized JSON (kombu's tagged form for datetimes, UUIDs and decimals)
instead of the Python objects means an argument that cannot be published is refused
before the caller commits, not discovered by the relay after the fact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

from outbox.errors import ArgumentNotSerializableError


def to_wire(value: Any, *, where: str) -> Any:
    """Return ``value`` as the plain JSON data Celery's serializer would publish.

    ``where`` names the value in the error (``"args"``, ``"kwargs"``, ``"headers"``).
    """
    return encode(value, where=where)[0]


def encode(value: Any, *, where: str) -> tuple[Any, int]:
    """Like :func:`to_wire`, also returning the size of the serialized JSON in bytes."""
    try:
        try:
            # The encoder kombu's dumps subclasses, without its fallback for the types
            # JSON has none of: the same text wherever no fallback is needed (most
            # arguments), without building an encoder on every call.
            text = json.dumps(value)
        except TypeError:
            text = kombu_dumps(value)
        # NaN and Infinity are not JSON: PostgreSQL's JSONB would refuse them at commit,
        # far from the call that put them there.
        wire = _STRICT_JSON.decode(text)
        # Likewise NUL characters and lone surrogates, which JSON text can escape but
        # JSONB cannot store. The escape only appears in the text when one may be there.
        if "\\u0000" in text or "\\ud" in text:
            _refuse_unstorable_strings(wire)
        return wire, len(text.encode())
    except (TypeError, ValueError, OverflowError) as e:
        culprit, path = _find_culprit(value, where)
        raise ArgumentNotSerializableError(
            f"{path}={culprit!r} ({type(culprit).__name__}) cannot be serialized with Celery's "
            "JSON serializer and stored: pass JSON types (strings without NUL characters or "
            "lone surrogates), datetime, date, time, UUID or Decimal instead (e.g. an id "
            "rather than an object)."
        ) from e


def from_wire(value: Any) -> Any:
    """Turn stored wire JSON back into the Python values the task was enqueued with.

    Only values kombu tagged (datetimes, UUIDs, decimals, bytes: ``{"__type__": ...}``)
    need its decoder; the rest (most arguments) come back as a copy of what was stored,
    without paying for the decoder's hook on every object, once per published row.
    """
    return decode_wire(json.dumps(value))


def decode_wire(text: str) -> Any:
    """:func:`from_wire` for the stored JSON as text (what the relay reads, so that the
    driver does not parse it only for it to be written out and parsed again)."""
    return kombu_loads(text) if _TYPE_TAG in text else json.loads(text)


#: How kombu's JSON marks a value it encoded as a tagged object.
_TYPE_TAG = '"__type__"'


def _find_culprit(value: Any, path: str) -> tuple[Any, str]:
    """Descend to the innermost part of ``value`` that does not serialize, for the message."""
    children: list[tuple[Any, str]] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool) and key is not None:
                return key, f"{path} key"
            if isinstance(key, str):
                try:
                    _refuse_unstorable_strings(key)
                except ValueError:
                    return key, f"{path} key"
            children.append((item, f"{path}[{key!r}]"))
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray):
        children.extend((item, f"{path}[{index}]") for index, item in enumerate(value))
    for child, child_path in children:
        try:
            encode(child, where=child_path)
        except ArgumentNotSerializableError:
            return _find_culprit(child, child_path)
    return value, path


def _refuse_unstorable_strings(value: Any) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("NUL characters cannot be stored")
        value.encode("utf-8")  # raises on a lone surrogate
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_unstorable_strings(key)
            _refuse_unstorable_strings(item)
    elif isinstance(value, list):
        for item in value:
            _refuse_unstorable_strings(item)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: JSON as JSONB takes it: NaN and Infinity refused.
_STRICT_JSON = json.JSONDecoder(parse_constant=_refuse_constant)
