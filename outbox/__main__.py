"""``python -m outbox``: the operational commands without Flask (:mod:`outbox.admin.cli`)."""

from outbox.admin.cli import main

if __name__ == "__main__":
    main(prog_name="python -m outbox")
