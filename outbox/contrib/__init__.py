"""Thin integrations with frameworks; the core in :mod:`outbox` imports none of them."""
