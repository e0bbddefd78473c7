"""One error shape for every failure: `{"error": {"code", "message", "details"}}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("atomo.control")

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    431: "request_header_fields_too_large",
    500: "internal_error",
    503: "unavailable",
}


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    def __init__(self, status: int, message: str, details: Any = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.details, self.headers = status, message, details, headers


def error_response(status: int, message: str, details: Any = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"code": CODES.get(status, f"http_{status}"), "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=headers)


def field_path(loc: tuple) -> str:
    """("body", "codec", "budget") -> "codec.budget"; list indices as [i]."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def allowed_methods(app: FastAPI, scope) -> list[str]:
    """Every method some route serves at this path."""
    methods = set()
    for route in app.router.routes:
        if route.matches(scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def is_json(content_type: str) -> bool:
    """Whether a Content-Type names JSON (application/json, or a +json type), parameters aside."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.details, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8): a 422 like bad JSON
            details = [{"field": "body", "in": "body", "message": str(exc.detail)}]
            return error_response(422, "invalid request: body", details)
        if exc.status_code == 405:  # Starlette names only the first matching route's methods
            headers = {"Allow": ", ".join(allowed_methods(app, request.scope))}
        return error_response(exc.status_code, str(exc.detail), None, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        content_type = request.headers.get("content-type")
        body_errors = any(e["loc"][:1] == ("body",) for e in exc.errors())
        if body_errors and content_type is not None and not is_json(content_type):  # e.g. `curl -d` sends a form
            message = f"the body must be JSON: send it with Content-Type: application/json (got {content_type[:100]})"
            details = [{"field": "body", "in": "header", "message": message}]
            return error_response(415, message, details)
        details = [
            {
                "field": "body" if e["type"] == "json_invalid" else field_path(tuple(e["loc"])),
                "in": e["loc"][0] if e["loc"] else "body",
                "message": e["msg"],
            }
            for e in exc.errors()
        ]
        fields = ", ".join(dict.fromkeys(d["field"] for d in details))
        return error_response(422, f"invalid request: {fields}", details)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error", None)
