"""Documented import paths that moved with the layout keep working for one release, and
say where the name lives now."""

from __future__ import annotations

import importlib

import pytest

#: (old module, new module, a name users import from it).
MOVED = [
    ("outbox.schema", "outbox.data.schema", "UTCDateTime"),
    ("outbox.relay_loop", "outbox.relays.loop", "RelayLoop"),
    ("outbox.lifecycle", "outbox.consumers.lifecycle", "LifecycleTracker"),
]


@pytest.mark.parametrize(("old", "new", "name"), MOVED)
def test_an_old_path_gives_the_same_object_and_names_the_new_one(
    old: str, new: str, name: str
) -> None:
    shim = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {new}: import {name} from"):
        found = getattr(shim, name)
    assert getattr(importlib.import_module(new), name) is found


def test_a_name_the_new_module_lacks_is_still_an_attribute_error() -> None:
    shim = importlib.import_module("outbox.schema")
    with pytest.warns(DeprecationWarning, match="moved to"), pytest.raises(AttributeError):
        shim.no_such_name  # noqa: B018
