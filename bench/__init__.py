"""Benchmarks of celery-outbox against the real PostgreSQL and Redis: ``python -m bench``.

Run by hand, not by the test suite: each figure is a median over repeated runs, and every
comparison (outbox vs ``.delay()``, one relay vs two, ...) is measured interleaved in the
same run, so drift in the machine's speed affects both sides alike. ``python -m bench
--help`` lists the sections and options.
"""
