"""An application of its own for the task-shape matrix: plain SQLAlchemy, no Flask, wired
the way a user wires the outbox, with one task per shape users write."""
