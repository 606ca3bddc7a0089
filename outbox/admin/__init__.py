"""Administration: the command line (``flask outbox …``, ``python -m outbox …``) and the
operations it and the dashboard share: finding tasks, reviving dead rows."""
