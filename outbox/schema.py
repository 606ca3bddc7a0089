"""Moved to :mod:`outbox.data.schema`.

This path forwards to it, with a DeprecationWarning, until 0.3.
"""

from outbox._moved import forward

__getattr__ = forward(__name__, "outbox.data.schema")
