"""A read-only dashboard for a Flask app that uses :class:`outbox.contrib.flask.Outbox`.

``app.register_blueprint(dashboard_blueprint())`` serves it at ``/outbox``: the outbox's
health at a glance (the same figures as ``flask outbox status``, judged against
``OUTBOX_HEALTH_MAX_LAG`` like ``/healthz``), the latest dead rows, and a search by task
id or argument value (see :mod:`outbox.admin.search`) showing each task's outbox status and
what the worker reported about it. The page changes nothing.

The page shows task arguments and errors, which are often personal data, so it is
**closed until it is configured**: without ``OUTBOX_DASHBOARD_BASIC_AUTH`` it answers 403
with a page saying how to open it. ``OUTBOX_DASHBOARD_BASIC_AUTH`` holds
``user1:password1,user2:password2`` (Flower's format) and turns on HTTP basic auth; basic
auth sends the password with every request, so serve the app over HTTPS beyond
localhost. ``OUTBOX_DASHBOARD_PUBLIC=true`` opens it to anyone who can reach the app
instead, for a laptop or a page already behind your own authentication.

``OUTBOX_FLOWER_URL`` (e.g. ``http://127.0.0.1:5555``) links each task id to its Flower
page. The page is rendered from templates shipped in this package, with inline CSS and
no JavaScript, so it needs nothing from the internet; its Content-Security-Policy
forbids scripts altogether. An app can restyle it by shipping its own
``templates/outbox/dashboard.html``, which Flask finds before the blueprint's.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, current_app, g, render_template, request
from sqlalchemy import Row

from outbox.admin.cli import flower_task_url
from outbox.admin.search import TaskSearch, find_tasks, latest_dead, parse_search
from outbox.clock import utcnow
from outbox.contrib.flask import EXTENSION_NAME
from outbox.data.schema import OutboxStatus
from outbox.enqueue.serialization import from_wire
from outbox.errors import InvalidSearchError, InvalidSettingError
from outbox.observability.health import DEFAULT_MAX_LAG, assess
from outbox.observability.stats import collect_stats
from outbox.settings import parse_flag

logger = logging.getLogger(__name__)

BASIC_AUTH_KEY = "OUTBOX_DASHBOARD_BASIC_AUTH"
PUBLIC_KEY = "OUTBOX_DASHBOARD_PUBLIC"
#: What a visitor of a dashboard nobody configured reads.
CLOSED_MESSAGE = (
    "The outbox dashboard is closed: it shows task arguments and errors, so it opens only "
    f"once it is configured. Set {BASIC_AUTH_KEY}=user:password (several as "
    f"user1:password1,user2:password2) to require HTTP basic auth, or {PUBLIC_KEY}=true "
    "to open it to anyone who can reach this app.\n"
)
#: Dead rows listed on the page, newest first.
DEAD_ROWS_SHOWN = 20
#: Search results listed, newest first.
SEARCH_RESULTS_SHOWN = 100
#: Arguments longer than this are cut in the table (the full text is in the tooltip).
ARGS_SHOWN_CHARS = 120


def dashboard_blueprint(url_prefix: str = "/outbox") -> Blueprint:
    """The dashboard as a blueprint, served at ``url_prefix`` (see the module docstring)."""
    # "/outbox/" and "outbox" mean /outbox; "/" the application's root.
    url_prefix = "/" + url_prefix.strip("/")
    bp = Blueprint("outbox_dashboard", __name__, url_prefix=url_prefix, template_folder="templates")

    @bp.record_once
    def _check_settings(setup: Any) -> None:
        # A malformed value fails at start-up rather than at the first visit.
        users = basic_auth_users(setup.app.config)
        if _public(setup.app.config) and not users:
            logger.warning(
                "%s=true: the outbox dashboard at %s, with task arguments, is open to anyone "
                "who can reach this app",
                PUBLIC_KEY,
                url_prefix,
            )

    @bp.before_request
    def _require_credentials() -> Response | None:
        users = basic_auth_users(current_app.config)
        if not users:
            if _public(current_app.config):
                return None
            return Response(CLOSED_MESSAGE, 403, mimetype="text/plain")
        if not _authorized(users):
            return Response(
                "Authentication required.\n",
                401,
                {"WWW-Authenticate": 'Basic realm="celery-outbox", charset="UTF-8"'},
                mimetype="text/plain",
            )
        return None

    @bp.after_request
    def _security_headers(response: Response) -> Response:
        nonce = g.get("outbox_style_nonce", "none")
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; style-src 'nonce-{nonce}'; img-src data:; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        # Task arguments and errors may be personal data: keep them out of shared caches.
        response.headers["Cache-Control"] = "no-store"
        return response

    @bp.get("")
    def index() -> tuple[str, int]:
        state = current_app.extensions[EXTENSION_NAME]
        max_lag = float(current_app.config.get("OUTBOX_HEALTH_MAX_LAG", DEFAULT_MAX_LAG))
        text = request.args.get("q", "").strip()
        search: TaskSearch | None = None
        error: str | None = None
        if text:
            try:
                search = parse_search(text)
            except InvalidSearchError as e:
                error = str(e)
        now = utcnow()
        results: list[Row[Any]] | None = None
        with state.db.engine.connect() as conn:
            stats = collect_stats(conn, now)
            dead = latest_dead(conn, limit=DEAD_ROWS_SHOWN)
            if search is not None:
                try:
                    results = find_tasks(conn, search, limit=SEARCH_RESULTS_SHOWN)
                except InvalidSearchError as e:
                    error = str(e)
        g.outbox_style_nonce = secrets.token_urlsafe(16)
        page = render_template(
            "outbox/dashboard.html",
            app_name=current_app.name,
            now=now,
            health=assess(stats, max_lag),
            max_lag=max_lag,
            stats=stats,
            statuses=[str(OutboxStatus.PENDING), str(OutboxStatus.DEAD)],
            dead=dead,
            query=text,
            error=error,
            results=results,
            results_shown=SEARCH_RESULTS_SHOWN,
            args_shown_chars=ARGS_SHOWN_CHARS,
            style_nonce=g.outbox_style_nonce,
            flower_url=lambda task_id: flower_task_url(current_app.config, task_id),
            call=format_call,
            ago=lambda moment: format_age(now, moment),
            duration=format_duration,
        )
        return page, 400 if error else 200

    return bp


def basic_auth_users(config: Any) -> tuple[str, ...]:
    """``OUTBOX_DASHBOARD_BASIC_AUTH`` as ``("user:password", ...)``; empty when unset.

    The format is Flower's: ``user1:password1,user2:password2``. Passwords may contain
    ``:`` (the first one separates the user), not ``,``.
    """
    raw = config.get(BASIC_AUTH_KEY)
    if raw is None:
        return ()
    users: list[str] = []
    for position, entry in enumerate(str(raw).split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        user, colon, password = entry.partition(":")
        if not (user and colon and password):
            # The value holds passwords: say which entry is wrong, never what it holds.
            raise InvalidSettingError(
                f"{BASIC_AUTH_KEY}: entry {position} is not user:password; write "
                "user1:password1,user2:password2."
            )
        users.append(entry)
    return tuple(users)


def _public(config: Any) -> bool:
    return parse_flag(PUBLIC_KEY, config.get(PUBLIC_KEY, False))


def _authorized(users: tuple[str, ...]) -> bool:
    """Whether the request's basic credentials are one of ``users``, in constant time."""
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return False
    given = f"{auth.username or ''}:{auth.password or ''}".encode()
    # Compare with every entry, so the time taken does not tell which one came close.
    matches = [hmac.compare_digest(given, entry.encode()) for entry in users]
    return any(matches)


def format_call(args: list[Any] | None, kwargs: dict[str, Any] | None) -> str:
    """Arguments as in a call: ``42, "BOOK-1", amount=Decimal("59.90")``.

    Values Celery's serializer tagged (``{"__type__": "decimal", ...}``) are shown as the
    value they stand for.
    """
    parts = [_literal(value) for value in args or ()]
    parts += [f"{key}={_literal(value)}" for key, value in (kwargs or {}).items()]
    return ", ".join(parts)


def _literal(value: Any) -> str:
    if isinstance(value, dict):
        if "__type__" in value and "__value__" in value:
            try:
                decoded = from_wire(value)
            except Exception:  # a malformed tag is shown as stored, never a failed page
                decoded = value
            if not isinstance(decoded, dict):
                text = decoded.isoformat() if hasattr(decoded, "isoformat") else str(decoded)
                return f"{type(decoded).__name__}({json.dumps(text)})"
        items = (f"{json.dumps(str(key))}: {_literal(item)}" for key, item in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def format_age(now: datetime, moment: datetime | None) -> str:
    """``"4s ago"``, ``"12m ago"``, ``"in 30s"`` (for rows not yet due); ``""`` for None."""
    if moment is None:
        return ""
    seconds = (now - moment).total_seconds()
    if seconds < 0:
        return f"in {format_duration(-seconds)}"
    return f"{format_duration(seconds)} ago"


def format_duration(seconds: float | None) -> str:
    """A short human duration: ``0.35s``, ``42s``, ``12m``, ``3h 5m``, ``2d 4h``."""
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.2f}s" if seconds < 1 else f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, _ = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"
