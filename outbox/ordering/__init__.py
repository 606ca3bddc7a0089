"""Per-key ordering: a key's tasks run one at a time in commit order. Keys are named and
numbered at enqueue (keys), and each finished task hands its key on (handover)."""
