"""Who is calling: the API key of a request, its rate limit, and its ownership of jobs.

A key comes as ``Authorization: Bearer <key>``, as ``X-API-Key: <key>``, or (for the web
UI, whose ``<img>`` tags and event stream cannot send headers) as the ``imgsift_key``
cookie that ``POST /v1/session`` sets: HttpOnly and ``SameSite=Strict``, so no other site's
page can make a browser send it. Every route but ``/healthz``, ``/metrics``, the UI's static
files, the OpenAPI document and the login itself needs one.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyCookie, APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from imgsift_common.apikeys import ApiKey, ApiKeyStore

SESSION_COOKIE = "imgsift_key"

bearer = HTTPBearer(auto_error=False, description="an imgsift API key: `Authorization: Bearer isk_...`")
header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="an imgsift API key")
cookie_key = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, description="set by POST /v1/session (web UI)")


class RateLimiter:
    """A moving window per key, kept in Redis by the ``limits`` library (shared by every API replica)."""

    def __init__(self, redis_url: str, default: str) -> None:
        from limits import parse
        from limits.storage import storage_from_string
        from limits.strategies import MovingWindowRateLimiter

        self._parse = parse
        self.default = parse(default)
        self.limiter = MovingWindowRateLimiter(storage_from_string(redis_url))

    def hit(self, key: ApiKey) -> float | None:
        """Count one request of ``key``: None when allowed, else the seconds until it would be."""
        limit = self._parse(key.rate_limit) if key.rate_limit else self.default
        if self.limiter.hit(limit, "imgsift-api", key.id):
            return None
        stats = self.limiter.get_window_stats(limit, "imgsift-api", key.id)
        return max(1.0, stats.reset_time - time.time())


def unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    api_key: Annotated[str | None, Security(header_key)],
    cookie: Annotated[str | None, Security(cookie_key)],
) -> ApiKey:
    """The calling key's record; 401 without a valid key, 429 past its rate limit."""
    sent = credentials.credentials if credentials else api_key or cookie
    if not sent:
        raise unauthorized("send an API key: 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    keys: ApiKeyStore = request.app.state.keys
    record = keys.lookup(sent)
    if record is None:
        raise unauthorized("unknown or revoked API key")
    limiter: RateLimiter = request.app.state.limiter
    wait = limiter.hit(record)
    if wait is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"rate limit of key {record.id} reached; retry in {math.ceil(wait)} s",
            headers={"Retry-After": str(math.ceil(wait))},
        )
    return record


Principal = Annotated[ApiKey, Depends(get_principal)]


def require_admin(principal: Principal) -> ApiKey:
    if not principal.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs an admin API key")
    return principal


Admin = Annotated[ApiKey, Depends(require_admin)]


class BodyLimit:
    """ASGI middleware: a request body over the limit gets 413, declared or streamed.

    The limit is the app's ``settings.max_request_bytes`` (``IMGSIFT_API_MAX_REQUEST_BYTES``).
    A declared ``Content-Length`` over it is refused before a byte is read; a chunked body is
    counted as it arrives and the request is answered 413 once it passes the limit (whatever
    the app was about to answer instead).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes: int = scope["app"].state.settings.max_request_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await self._refuse(send, max_bytes)
            return
        seen = 0
        over = False
        started = False

        async def counted() -> dict[str, Any]:
            nonlocal seen, over
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: dict[str, Any]) -> None:
            nonlocal started
            if over:
                if not started:
                    started = True
                    await self._refuse(send, max_bytes)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(send, max_bytes)

    @staticmethod
    async def _refuse(send: Any, max_bytes: int) -> None:
        body = f'{{"detail":"the request body is over {max_bytes} bytes"}}'.encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
