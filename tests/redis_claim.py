"""Claiming a Redis DB index for one run, so concurrent runs never share a broker DB.

DB 0 is the machine's shared default; a run (a test session, a benchmark) takes one of
the others by setting a claim key with SET NX, and gives it back by emptying the DB. The
claim expires, so a run that died without releasing it frees its index eventually. No
pytest here: the benchmark (``python -m bench``) claims its DB the same way.
"""

from __future__ import annotations

import redis

#: DB 0 is the machine's shared default; runs take one of the others.
REDIS_RUN_DBS = range(1, 16)
REDIS_CLAIM_KEY = "celery-outbox:test-run"
REDIS_CLAIM_SECONDS = 2 * 3600


def claim_redis_db(server: str, owner: str) -> int | None:
    """Take the first empty Redis DB no other run holds (SET NX), or None if Redis is down.

    ``server`` is a URL without a DB index (``redis://127.0.0.1:6379``); ``owner`` is
    stored in the claim key so only this run releases it.
    """
    for index in REDIS_RUN_DBS:
        try:
            client = redis.Redis.from_url(f"{server}/{index}", socket_timeout=2)
            if client.set(REDIS_CLAIM_KEY, owner, nx=True, ex=REDIS_CLAIM_SECONDS):
                if client.dbsize() == 1:
                    return index
                client.delete(REDIS_CLAIM_KEY)
        except redis.ConnectionError:
            return None
    return None


def release_redis_db(server: str, index: int, owner: str) -> None:
    """Empty the DB, which drops the claim with everything else, if ``owner`` still holds it."""
    client = redis.Redis.from_url(f"{server}/{index}", socket_timeout=2)
    if client.get(REDIS_CLAIM_KEY) == owner.encode():
        client.flushdb()
