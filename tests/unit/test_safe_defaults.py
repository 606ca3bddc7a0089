"""What ships is safe by default: no fault injection in the library, no secrets on a
command line in the documentation."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: A shell line that puts a secret in a process's arguments or before a command.
SECRET_ON_A_COMMAND_LINE = re.compile(
    r"--basic[-_]auth[= ]\S|\b\w*(AUTH|PASSWORD|SECRET)\w*=\S+\s+\S", re.IGNORECASE
)


def shell_lines(markdown: str) -> list[str]:
    """The lines of the document's bash code blocks."""
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", markdown, re.S)
    return [line for block in blocks for line in block.splitlines()]


def test_the_library_has_no_way_to_crash_itself() -> None:
    """The relay's crash point for chaos tests lives in tests/, not in the package."""
    sources = {path: path.read_text() for path in (ROOT / "outbox").rglob("*.py")}
    assert [] == [str(path) for path, text in sources.items() if "os._exit" in text]
    assert [] == [str(path) for path, text in sources.items() if "CRASH" in text]


def test_the_documentation_puts_no_secret_on_a_command_line() -> None:
    """Flower's and the dashboard's credentials come from the environment in every
    command the README and the compose file show."""
    for document in ("README.md", "docker-compose.yml"):
        text = (ROOT / document).read_text()
        if document.endswith(".md"):
            lines = shell_lines(text)
        else:  # the compose file's commands and values, not its comments
            lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        assert [] == [line for line in lines if SECRET_ON_A_COMMAND_LINE.search(line)], document


def test_the_check_catches_a_secret_on_a_command_line() -> None:
    """The pattern above finds the forms it is there to refuse."""
    for line in (
        "celery -A tasks flower --basic-auth=admin:change-me",
        "FLOWER_BASIC_AUTH=admin:change-me docker compose up --build",
    ):
        assert SECRET_ON_A_COMMAND_LINE.search(line), line
    assert not SECRET_ON_A_COMMAND_LINE.search("FLOWER_BASIC_AUTH=admin:a-long-password")
