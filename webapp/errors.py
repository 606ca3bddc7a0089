"""Every error leaves the API as JSON: ``{"error": code, "message": text}``."""

from __future__ import annotations

from typing import Any

from flask import Flask
from werkzeug.exceptions import HTTPException


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
