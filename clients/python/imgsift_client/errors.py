"""Typed errors: what the API said, with its status code."""

from __future__ import annotations

from typing import Any


class ImgsiftError(Exception):
    """An error answer of the API (``status``, ``message``: its ``detail``), or a client-side failure."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.message = message
        self.status = status
        self.body = body


class Unauthorized(ImgsiftError):
    """401: no API key, or one the API does not know (revoked?); pass ``api_key`` or set IMGSIFT_API_KEY."""


class Forbidden(ImgsiftError):
    """403: the key may not do this (key management and operator views need an admin key)."""


class TooLarge(ImgsiftError):
    """413: the request body is over the API's limit (IMGSIFT_API_MAX_REQUEST_BYTES)."""


class RateLimited(ImgsiftError):
    """429: the key's rate limit is reached; ``retry_after`` says how many seconds to wait."""

    retry_after: float | None = None


class InvalidRequest(ImgsiftError):
    """422: the request was refused; ``message`` says what to fix."""


class NotFound(ImgsiftError):
    """404: no such job, crop or export."""


class Conflict(ImgsiftError):
    """409: not possible in the resource's current state (a final job, an export not done yet)."""


class Unavailable(ImgsiftError):
    """503: the API cannot reach its queue or storage; retry later."""


class JobFailed(ImgsiftError):
    """The job ended failed or cancelled while being waited for."""


class WaitTimeout(ImgsiftError):
    """A wait ran out of time before the job (or export) finished."""


_BY_STATUS: dict[int, type[ImgsiftError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: InvalidRequest,
    429: RateLimited,
    503: Unavailable,
}


def error_for(status: int, body: Any, retry_after: str | None = None) -> ImgsiftError:
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI's validation errors
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in detail)
    elif isinstance(detail, dict):
        errors = detail.get("errors") or []
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in errors)
        message = message or str(detail)
    else:
        message = str(detail)
    error = _BY_STATUS.get(status, ImgsiftError)(message, status, body)
    if isinstance(error, RateLimited) and retry_after and retry_after.isdigit():
        error.retry_after = float(retry_after)
    return error
