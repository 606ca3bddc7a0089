"""PostgreSQL's own features: wake-ups by LISTEN/NOTIFY, the logical replication slot,
and the pgoutput decoder the change-data-capture relay reads it with. (PostgreSQL's SQL
dialect is in :mod:`outbox.data.postgresql`.)"""
