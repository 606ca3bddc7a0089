"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

Every command the stack runs is resolved the way its tool would resolve it (Celery's
click commands, gunicorn's argument parser and app loader, ``flask --app``), so a renamed
module, task queue or CLI command fails here rather than in a container that restarts
forever.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml
from celery import Celery

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

REQUIRED_SERVICES = {"postgres", "redis", "web", "worker", "beat", "flower"}
#: migrate is a one-shot job; beat exposes nothing a healthcheck could probe.
WITHOUT_HEALTHCHECK = {"migrate", "beat"}
APP_ENVIRONMENT = {"DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"}
#: The ``${VAR:?message}`` form: Compose refuses to start when VAR is unset or empty.
REQUIRED_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):\?[^}]+\}")
VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<modifier>[^}]*)\}")
FLOWER_AUTH_VARIABLE = "FLOWER_BASIC_AUTH"
#: Compose-interpolated variables that may carry a default: the local database password.
VARIABLES_WITH_DEFAULTS = {"POSTGRES_PASSWORD"}


# --- reading the files ---------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    return dict(compose["services"])


@pytest.fixture
def demo_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Keep anything the embedded fallback config writes out of the checkout."""
    monkeypatch.setenv("OUTBOX_DEMO_DIR", str(tmp_path))
    return tmp_path


def compose_strings() -> Iterator[str]:
    """Every key and value in the file: what Compose interpolates (comments are not)."""
    nodes: list[Any] = [yaml.safe_load(COMPOSE_FILE.read_text())]
    while nodes:
        node = nodes.pop()
        if isinstance(node, str):
            yield node
        elif isinstance(node, Mapping):
            nodes += [*node.keys(), *node.values()]
        elif isinstance(node, list):
            nodes += node


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, Mapping):
        return {str(key): "" if value is None else str(value) for key, value in raw.items()}
    return dict(str(item).partition("=")[::2] for item in raw)


def argv(command: str | Sequence[Any]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def healthcheck_argv(test: str | Sequence[Any]) -> list[str]:
    if isinstance(test, str):
        return shlex.split(test)
    kind, *rest = (str(item) for item in test)
    return shlex.split(rest[0]) if kind == "CMD-SHELL" else rest


def has_healthcheck(service: Mapping[str, Any]) -> bool:
    check = service.get("healthcheck") or {}
    test = check.get("test")
    return not check.get("disable") and bool(test) and test not in ("NONE", ["NONE"])


def commands(services: Mapping[str, Mapping[str, Any]]) -> Iterator[tuple[str, list[str]]]:
    """Every argv the stack runs: each service's command and healthcheck test."""
    for name, service in services.items():
        if "command" in service:
            yield f"{name}.command", argv(service["command"])
        if has_healthcheck(service):
            yield f"{name}.healthcheck", healthcheck_argv(service["healthcheck"]["test"])


def commands_of(services: Mapping[str, Mapping[str, Any]], program: str) -> list[list[str]]:
    return [args for _, args in commands(services) if args and args[0] == program]


def published_container_ports(service: Mapping[str, Any]) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        target = port["target"] if isinstance(port, Mapping) else str(port).rsplit(":", 1)[-1]
        ports.add(int(str(target).split("/")[0]))
    return ports


# --- parsing command lines the way click parses them ---------------------------------


@dataclass
class Parsed:
    options: dict[str, str | None] = field(default_factory=dict)
    positionals: list[str] = field(default_factory=list)
    rest: list[str] = field(default_factory=list)


def parse_click(command: click.Command, tokens: Sequence[str], *, interspersed: bool) -> Parsed:
    """Options of ``command`` in ``tokens``, keyed by parameter name; unknown ones fail.

    Without ``interspersed`` (a group) parsing stops at the first positional, the
    subcommand, which starts ``rest``.
    """
    takes_value: dict[str, tuple[str, bool]] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for opt in (*param.opts, *param.secondary_opts):
                takes_value[opt] = (str(param.name), not (param.is_flag or param.count))
    parsed = Parsed()
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if token == "-" or not token.startswith("-"):
            if not interspersed:
                parsed.rest = list(tokens[index - 1 :])
                return parsed
            parsed.positionals.append(token)
            continue
        name, has_value, value = token.partition("=")
        if name not in takes_value and not token.startswith("--") and token[:2] in takes_value:
            name, has_value, value = token[:2], "=", token[2:]  # -c2
        assert name in takes_value, f"`{command.name}` has no option {name} ({list(tokens)})"
        param_name, needs_value = takes_value[name]
        if needs_value and not has_value:
            value = tokens[index]
            index += 1
        parsed.options[param_name] = value if needs_value else None
    return parsed


@dataclass
class CeleryCommand:
    app: str | None
    subcommand: str
    parsed: Parsed
    argv: list[str]


def celery_commands(services: Mapping[str, Mapping[str, Any]]) -> list[CeleryCommand]:
    from celery.bin.celery import celery as celery_cli

    found = []
    for args in commands_of(services, "celery"):
        top = parse_click(celery_cli, args[1:], interspersed=False)
        assert top.rest, f"no celery subcommand in {args}"
        subcommand, *sub_args = top.rest
        assert subcommand in celery_cli.commands, f"`celery {subcommand}` does not exist"
        sub = celery_cli.commands[subcommand]
        if subcommand == "flower":
            # Flower hands its arguments to tornado.options instead of declaring them in click.
            parsed = Parsed(rest=sub_args)
        else:
            parsed = parse_click(sub, sub_args, interspersed=True)
        found.append(CeleryCommand(top.options.get("app"), subcommand, parsed, args))
    return found


def flower_options(args: Sequence[str]) -> dict[str, str | None]:
    options: dict[str, str | None] = {}
    for token in args:
        assert token.startswith("--"), f"flower takes --name=value options, got {token!r}"
        name, has_value, value = token[2:].partition("=")
        options[name] = value if has_value else None
    return options


def basic_auth_values(args: Sequence[str]) -> list[str]:
    """Values of flower's --basic-auth option, in either its =value or its spaced form."""
    values = []
    for index, token in enumerate(args):
        name, has_value, value = token.partition("=")
        if name in ("--basic-auth", "--basic_auth"):
            values.append(value if has_value else args[index + 1])
    return values


def celery_app(name: str | None) -> Celery:
    assert name is not None, "celery runs without -A"
    module_name, _, attribute = name.partition(":")
    module = importlib.import_module(module_name)
    app = getattr(module, attribute or "app", None)
    assert isinstance(app, Celery), f"-A {name}: {module_name}.{attribute or 'app'} is {app!r}"
    return app


def worker_queues(command: CeleryCommand, app: Celery) -> set[str]:
    """The queues a worker command consumes: its -Q, else every queue the app declares
    (Celery's own rule: ``task_queues``, or the default queue when none is declared)."""
    queues = command.parsed.options.get("queues")
    if queues is None:
        # From the configuration: app.amqp.queues also gains every queue published to.
        declared = app.conf.task_queues
        return {queue.name for queue in declared} if declared else {app.conf.task_default_queue}
    return {queue.strip() for queue in queues.split(",") if queue.strip()}


def routed_queues(app: Celery) -> set[str]:
    """Queues tasks are sent to by ``task_routes`` or by a beat entry's options."""
    routes = app.conf.task_routes or {}
    routers = [routes] if isinstance(routes, Mapping) else list(routes)
    queues = set()
    for router in routers:
        assert isinstance(router, Mapping), f"cannot read queues from router {router!r}"
        for route in router.values():
            queue = route if isinstance(route, str) else route.get("queue")
            if queue is not None:
                queues.add(getattr(queue, "name", queue))
    for entry in (app.conf.beat_schedule or {}).values():
        queue = entry.get("options", {}).get("queue")
        if queue is not None:
            queues.add(queue)
    return queues


# --- the Dockerfile --------------------------------------------------------------------


def build_context(service: Mapping[str, Any]) -> tuple[Path, Path]:
    build = service["build"]
    if isinstance(build, str):
        build = {"context": build}
    context = (COMPOSE_FILE.parent / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\") if pending else stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    return instructions


def copied_sources(dockerfile: Path) -> list[str]:
    """Build-context paths the Dockerfile COPYs or ADDs (not those from other stages)."""
    sources = []
    for keyword, arguments in dockerfile_instructions(dockerfile):
        if keyword not in ("COPY", "ADD"):
            continue
        tokens = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
        flags = [token for token in tokens if token.startswith("--")]
        if any(flag.startswith("--from=") for flag in flags):
            continue
        sources += [token for token in tokens if not token.startswith("--")][:-1]
    return sources


def built_services(services: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {name: service for name, service in services.items() if "build" in service}


# --- the tests -----------------------------------------------------------------------------


def test_required_services_exist(services: dict[str, dict[str, Any]]) -> None:
    """The stack defines postgres, redis, web, worker, beat and flower."""
    assert [] == sorted(REQUIRED_SERVICES - services.keys())


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    """Every service but the one-shot migrate job and beat declares an enabled healthcheck."""
    missing = [
        name
        for name, service in services.items()
        if name not in WITHOUT_HEALTHCHECK and not has_healthcheck(service)
    ]
    assert [] == missing


def test_dependency_conditions_can_be_met(services: dict[str, dict[str, Any]]) -> None:
    """depends_on waits only on existing services, healthy ones having a healthcheck."""
    problems = []
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        if not isinstance(depends_on, Mapping):
            depends_on = {target: {"condition": "service_started"} for target in depends_on}
        for target, spec in depends_on.items():
            condition = spec.get("condition", "service_started")
            if target not in services:
                problems.append(f"{name} depends on unknown service {target}")
            elif condition == "service_healthy" and not has_healthcheck(services[target]):
                problems.append(f"{name} waits for {target} to be healthy; it has no healthcheck")
            elif condition == "service_completed_successfully" and services[target].get(
                "restart", "no"
            ) not in ("no", "on-failure"):
                problems.append(f"{name} waits for {target} to exit, but it is always restarted")
    assert [] == problems


def test_migrate_is_a_one_shot_job(services: dict[str, dict[str, Any]]) -> None:
    """migrate is never restarted (the string "no": a bare YAML no would be false)."""
    assert "no" == services["migrate"].get("restart", "no")


@pytest.mark.usefixtures("demo_env")
def test_celery_commands_name_an_app_and_real_subcommands(
    services: dict[str, dict[str, Any]],
) -> None:
    """Each `celery -A X sub` imports X with a Celery `app` and runs a real subcommand."""
    found = celery_commands(services)
    assert [] == sorted({"worker", "beat", "flower"} - {command.subcommand for command in found})
    for command in found:
        celery_app(command.app)


def test_celery_subcommand_options_exist(services: dict[str, dict[str, Any]]) -> None:
    """Options passed to worker, beat, inspect and flower are ones those commands define."""
    from celery.worker.control import Panel
    from flower.options import options as flower_defined

    inspect_actions = {name for name, meta in Panel.meta.items() if meta.type == "inspect"}
    for command in celery_commands(services):  # click options are checked while parsing
        if command.subcommand == "inspect":
            assert [] == [a for a in command.parsed.positionals if a not in inspect_actions]
        if command.subcommand == "flower":
            unknown = [
                name for name in flower_options(command.parsed.rest) if name not in flower_defined
            ]
            assert [] == unknown


@pytest.mark.usefixtures("demo_env")
def test_worker_queues_are_default_or_routed(services: dict[str, dict[str, Any]]) -> None:
    """Every --queues entry is the app's default queue or a queue some task is routed to."""
    for command in celery_commands(services):
        if command.subcommand != "worker":
            continue
        app = celery_app(command.app)
        known = {app.conf.task_default_queue} | routed_queues(app)
        assert [] == sorted(worker_queues(command, app) - known)


@pytest.mark.usefixtures("demo_env")
def test_routed_queues_are_consumed(services: dict[str, dict[str, Any]]) -> None:
    """Some worker consumes every queue a task or beat entry is routed to (e.g. `outbox`)."""
    workers = [command for command in celery_commands(services) if command.subcommand == "worker"]
    assert workers
    for app_name in {command.app for command in workers}:
        app = celery_app(app_name)
        consumed = set().union(*(worker_queues(c, app) for c in workers if c.app == app_name))
        assert [] == sorted(routed_queues(app) - consumed)


def test_worker_healthcheck_pings_its_own_node(services: dict[str, dict[str, Any]]) -> None:
    """The worker healthcheck pings celery@$HOSTNAME, the worker's default node name."""
    found = celery_commands({"worker": services["worker"]})
    (worker,) = [command for command in found if command.subcommand == "worker"]
    assert "hostname" not in worker.parsed.options
    pings = [command.parsed.options for command in found if command.subcommand == "inspect"]
    assert ["celery@$$HOSTNAME"] == [options.get("destination") for options in pings]


@pytest.mark.usefixtures("demo_env")
def test_gunicorn_targets_load(services: dict[str, dict[str, Any]]) -> None:
    """Each gunicorn command parses and its "module:factory()" target is a callable."""
    from gunicorn.config import Config
    from gunicorn.util import import_app

    found = commands_of(services, "gunicorn")
    assert found
    for args in found:
        namespace, unknown = Config(prog="gunicorn").parser().parse_known_args(args[1:])
        assert [] == unknown
        (target,) = namespace.args
        module_name, _, expression = target.partition(":")
        attribute = getattr(importlib.import_module(module_name), expression.split("(")[0])
        assert callable(attribute)
        assert callable(import_app(target))  # what gunicorn's workers serve


@pytest.mark.usefixtures("demo_env")
def test_flask_commands_are_registered(services: dict[str, dict[str, Any]]) -> None:
    """Each `flask --app X cmd` names a command registered on the app X builds."""
    from flask.cli import cli as flask_cli
    from flask.cli import locate_app

    found = commands_of(services, "flask")
    assert found
    for args in found:
        parsed = parse_click(flask_cli, args[1:], interspersed=False)
        app_name = parsed.options.get("app")
        assert app_name is not None, f"{args} does not name the app with --app"
        module_name, _, app_expression = app_name.partition(":")
        app = locate_app(module_name, app_expression or None)
        assert app is not None
        name = parsed.rest[0]
        assert name in app.cli.list_commands(click.Context(app.cli))
        assert app.cli.get_command(click.Context(app.cli), name) is not None


def test_published_ports_are_the_ones_listened_on(services: dict[str, dict[str, Any]]) -> None:
    """web's --bind port and flower's --port are the container ports Compose publishes."""
    from gunicorn.config import Config

    web, _ = Config(prog="gunicorn").parser().parse_known_args(argv(services["web"]["command"])[1:])
    assert published_container_ports(services["web"]) == {
        int(bind.rsplit(":", 1)[1]) for bind in web.bind
    }
    flower = next(c for c in celery_commands(services) if c.subcommand == "flower")
    port = flower_options(flower.parsed.rest).get("port")
    assert published_container_ports(services["flower"]) == {int(port or 0)}


def test_builds_use_an_existing_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    """Every `build:` points at a Dockerfile that exists, and its COPY sources exist."""
    built = built_services(services)
    assert REQUIRED_SERVICES - {"postgres", "redis"} <= built.keys()
    for service in built.values():
        context, dockerfile = build_context(service)
        assert dockerfile.is_file(), f"{dockerfile} does not exist"
        sources = copied_sources(dockerfile)
        assert sources
        assert [] == [source for source in sources if not list(context.glob(source.rstrip("/")))]


def test_dockerfile_copies_what_the_wheel_build_needs(services: dict[str, dict[str, Any]]) -> None:
    """The image COPYs pyproject.toml, the readme and every path hatch packages."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {
        "pyproject.toml",
        pyproject["project"]["readme"],
        *wheel["packages"],
        *wheel.get("force-include", {}),
    }
    for service in built_services(services).values():
        _, dockerfile = build_context(service)
        copied = {source.rstrip("/").removeprefix("./") for source in copied_sources(dockerfile)}
        assert [] == ([] if "." in copied else sorted(needed - copied))


def test_image_runs_unprivileged_without_credentials(services: dict[str, dict[str, Any]]) -> None:
    """The image ends as a non-root USER and bakes in no password, secret or auth value."""
    for service in built_services(services).values():
        instructions = dockerfile_instructions(build_context(service)[1])
        users = [
            arguments.split(":")[0] for keyword, arguments in instructions if keyword == "USER"
        ]
        assert users
        assert users[-1] not in ("root", "0")
        baked = [
            arguments
            for keyword, arguments in instructions
            if keyword in ("ENV", "ARG", "CMD", "ENTRYPOINT")
            and re.search(r"PASSWORD|SECRET|TOKEN|BASIC_AUTH", arguments, re.IGNORECASE)
        ]
        assert [] == baked


def test_flower_auth_is_required_from_the_environment(
    services: dict[str, dict[str, Any]],
) -> None:
    """Flower's basic auth is ${FLOWER_BASIC_AUTH:?...}: no default, Compose fails unset."""
    flower = services["flower"]
    from_env = environment(flower).get(FLOWER_AUTH_VARIABLE)
    from_argv = basic_auth_values(argv(flower["command"]))
    sources = [value for value in (from_env, *from_argv) if value is not None]
    assert sources, "flower runs without --basic-auth or FLOWER_BASIC_AUTH"
    for value in sources:
        match = REQUIRED_VARIABLE.fullmatch(value)
        assert match is not None, f"{value!r} is not ${{{FLOWER_AUTH_VARIABLE}:?message}}"
        assert FLOWER_AUTH_VARIABLE == match["name"]


def test_no_flower_credentials_are_hard_coded(services: dict[str, dict[str, Any]]) -> None:
    """No service sets flower's credentials to a literal or to a variable with a default."""
    for text in compose_strings():
        for match in VARIABLE.finditer(text.replace("$$", "")):
            if match["name"] not in VARIABLES_WITH_DEFAULTS:
                assert ":?" == match["modifier"][:2], f"{match[0]} may resolve to a default"
    for name, service in services.items():
        value = environment(service).get(FLOWER_AUTH_VARIABLE)
        if value is not None:
            assert REQUIRED_VARIABLE.fullmatch(value), f"{name} sets {FLOWER_AUTH_VARIABLE}"
    for label, args in commands(services):
        for value in basic_auth_values(args):
            assert REQUIRED_VARIABLE.fullmatch(value), f"{label} hard-codes basic auth"


def test_dollar_signs_are_escaped_for_compose() -> None:
    """A $ meant for the container is written $$; a bare $NAME would be Compose's variable."""
    bare = [text for text in compose_strings() if re.search(r"\$(?!\{)", text.replace("$$", ""))]
    assert [] == bare


def test_app_services_share_the_environment(services: dict[str, dict[str, Any]]) -> None:
    """Every app service gets DATABASE_URL and the Celery URLs, pointing at the stack."""
    for name, service in built_services(services).items():
        env = environment(service)
        assert [] == sorted(APP_ENVIRONMENT - env.keys()), name
        for variable in sorted(APP_ENVIRONMENT):
            assert urlsplit(env[variable]).hostname in services, f"{name}: {variable}"
