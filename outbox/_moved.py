"""Import paths that moved in 0.2's layout keep working for one release.

Each old module is a shim whose attributes are looked up in the new one, with a
``DeprecationWarning`` that names the new path, raised where the caller imports.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

#: The release in which the old paths go.
REMOVED_IN = "0.3"


def forward(old: str, new: str) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``old`` that forwards each name to module ``new``."""

    def __getattr__(name: str) -> object:  # noqa: N807 - the module hook's own name
        if name.startswith("__"):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(
            f"{old} moved to {new}: import {name} from {new} "
            f"(the old path goes in celery-outbox {REMOVED_IN})",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new), name)

    return __getattr__
