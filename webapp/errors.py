"""Every error leaves the API as JSON: ``{"error": code, "message": text}``.

A request that fails because the database cannot be reached (refused, restarting, a
connection dropped under it) answers 503 with ``Retry-After``: the same request is worth
sending again shortly. Whether it changed anything is unknown unless it was a read: a
connection cut off during COMMIT may have committed. ``POST /orders`` with an
``Idempotency-Key`` is safe to send again; the other changes are guarded by the order's
status (a second confirm is a 409). Anything else unexpected answers 500, with the
details in the log rather than in the response.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, request
from werkzeug.exceptions import HTTPException

from outbox import is_transient_database_error

logger = logging.getLogger(__name__)

#: Seconds a client is asked to wait before retrying while the database is unreachable.
RETRY_AFTER_SECONDS = 5
#: Methods that change nothing: their failure leaves nothing in doubt.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ApiError(Exception):
    """An expected failure with its HTTP status, a stable code and a human message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(error: ApiError) -> tuple[dict[str, Any], int]:
        return {"error": error.code, "message": error.message}, error.status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[dict[str, Any], int]:
        code = (error.name or "error").lower().replace(" ", "_")
        return {"error": code, "message": error.description}, error.code or 500

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> tuple[dict[str, Any], int, dict[str, str]]:
        if is_transient_database_error(error):
            logger.warning("database unavailable: %s: %s", type(error).__name__, error)
            body = {
                "error": "database_unavailable",
                "message": f"The database cannot be reached right now; {_outcome()} "
                f"Try again in {RETRY_AFTER_SECONDS} seconds.",
            }
            return body, 503, {"Retry-After": str(RETRY_AFTER_SECONDS)}
        logger.exception("unexpected error")
        body = {"error": "internal_error", "message": "The server failed; it has been logged."}
        return body, 500, {}


def _outcome() -> str:
    """What the client can know of its request's effect when the database went away."""
    if request.method in SAFE_METHODS:
        return "nothing was changed."
    return (
        "whether this request's changes were saved is unknown (the connection may have "
        "been cut after the commit went through). Check before repeating it, or send it "
        "again with the same Idempotency-Key header (POST /orders), which cannot make a "
        "second order."
    )
