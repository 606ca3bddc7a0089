"""What the outbox tells about itself: counts and ages (stats), Prometheus metrics and
the health answer. (Trace context, which the enqueue, the publish and the worker all
carry, is :mod:`outbox.tracing`.)"""
