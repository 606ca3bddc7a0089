"""What runs in the Celery worker beside the user's tasks: the idempotent consumer (one
effect per task id), lifecycle tracking (each run's outcome on its row, an ordered key
handed on), and how a run ended as the outbox counts it."""
