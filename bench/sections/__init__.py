"""One module per section of ``python -m bench``; each ``run(ctx)`` returns its figures."""
