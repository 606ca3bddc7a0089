"""Every error leaves the API as JSON: ``{"error": code, "message": text}``.

A request that fails because the database cannot be reached (refused, restarting, a
connection dropped under it) answers 503 with ``Retry-After``: the request did nothing,
and the same request is worth sending again shortly. Anything else unexpected answers
500, with the details in the log rather than in the response.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask
from werkzeug.exceptions import HTTPException

from outbox import is_transient_database_error

logger = logging.getLogger(__name__)

#: Seconds a client is asked to wait before retrying while the database is unreachable.
RETRY_AFTER_SECONDS = 5


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
                "message": "The database cannot be reached right now; nothing was changed. "
                f"Try again in {RETRY_AFTER_SECONDS} seconds.",
            }
            return body, 503, {"Retry-After": str(RETRY_AFTER_SECONDS)}
        logger.exception("unexpected error")
        body = {"error": "internal_error", "message": "The server failed; it has been logged."}
        return body, 500, {}
