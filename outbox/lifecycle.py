"""Moved to :mod:`outbox.consumers.lifecycle`.

This path forwards to it, with a DeprecationWarning, until 0.3.
"""

from outbox._moved import forward

__getattr__ = forward(__name__, "outbox.consumers.lifecycle")
