"""What the outbox tells about itself: counts and ages (stats), Prometheus metrics,
the health answer, and trace context from the enqueuing request to the task."""
