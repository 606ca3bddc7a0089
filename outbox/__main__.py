"""``python -m outbox``: the operational commands without Flask (:mod:`outbox.cli`)."""

from outbox.cli import main

if __name__ == "__main__":
    main(prog_name="python -m outbox")
