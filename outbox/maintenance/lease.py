"""One relay at a time: a lease in the database, held by the relay that runs maintenance.

The maintenance passes (confirmation, key keeper) look at the whole outbox: run by every
relay, three relays would read the same rows, probe the same broker and publish the
same lost task three times over in an interval. So the relays elect one holder through
a row of ``celery_outbox_leases``: a relay runs the passes only while it holds the
lease, renews it at each pass, and gives it up when it stops. A holder that dies
without giving it up loses it when it expires (``LEASE_SECONDS``, a few passes), and
the next relay whose pass comes takes it over.

Expiry is read on the database's clock, never the relays' own: relays on machines whose
clocks disagree still agree on when a lease ran out, and a relay given a clock of its
own (tests do) cannot hold the lease into the others' future.

Taking the lease is one UPDATE guarded by "mine, or expired" (and an INSERT the first
time): two relays that try at once are serialised on the row, and the second finds the
first's fresh expiry and gets nothing.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import timedelta

from sqlalchemy import insert, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from outbox.data import Store, store_for
from outbox.data.schema import leases_table

#: Seconds a lease lasts after each pass that renewed it: three maintenance intervals,
#: so a holder that is merely slow keeps it and one that died is replaced within 15 s.
LEASE_SECONDS = 15.0

_l = leases_table.c


def holder_name() -> str:
    """``host:pid:random``: unique per relay, readable where an operator looks."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """A named lease in ``celery_outbox_leases``, held by at most one holder at a time."""

    def __init__(
        self,
        engine: Engine,
        name: str,
        *,
        store: Store | None = None,
        holder: str | None = None,
        seconds: float = LEASE_SECONDS,
    ) -> None:
        if seconds <= 0:
            raise ValueError(f"a lease of {seconds!r} seconds could never be held")
        self.engine = engine
        self.store = store or store_for(engine)
        self.name = name[: _l.name.type.length]  # type: ignore[attr-defined]
        self.holder = holder or holder_name()
        self.duration = timedelta(seconds=seconds)

    def hold(self) -> bool:
        """Take or renew the lease; whether this holder has it until ``seconds`` from now."""
        with self.engine.begin() as conn:
            now = self.store.database_now(conn)
            taken = conn.execute(
                update(leases_table)
                .where(_l.name == self.name, or_(_l.holder == self.holder, _l.expires_at < now))
                .values(holder=self.holder, expires_at=now + self.duration, renewed_at=now)
            ).rowcount
            if taken:
                return True
            if conn.execute(select(_l.name).where(_l.name == self.name)).first() is not None:
                return False  # another holder's, not yet expired
        try:
            with self.engine.begin() as conn:
                now = self.store.database_now(conn)
                conn.execute(
                    insert(leases_table).values(
                        name=self.name,
                        holder=self.holder,
                        expires_at=now + self.duration,
                        renewed_at=now,
                    )
                )
        except IntegrityError:
            return False  # another relay created it first: it holds it
        return True

    def release(self) -> None:
        """Give the lease up now, if this holder has it: the next relay need not wait for
        it to expire."""
        with self.engine.begin() as conn:
            now = self.store.database_now(conn)
            conn.execute(
                update(leases_table)
                .where(_l.name == self.name, _l.holder == self.holder)
                .values(expires_at=now - timedelta(microseconds=1))
            )

    def current_holder(self) -> str | None:
        """Who holds the lease now, by the database's clock (``None``: nobody)."""
        with self.engine.connect() as conn:
            now = self.store.database_now(conn)
            return conn.execute(
                select(_l.holder).where(_l.name == self.name, _l.expires_at >= now)
            ).scalar_one_or_none()
