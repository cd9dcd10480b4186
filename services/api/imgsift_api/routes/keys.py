"""API keys (admin keys only) and the web UI's session cookie."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, Response, status

from imgsift_api.auth import SESSION_COOKIE, Admin, Principal, unauthorized
from imgsift_api.schemas import KeyCreate, KeyCreated, Login
from imgsift_common.apikeys import ApiKey, ApiKeyStore

router = APIRouter(tags=["keys"])


def _keys(request: Request) -> ApiKeyStore:
    return request.app.state.keys


@router.post("/keys", response_model=KeyCreated, status_code=status.HTTP_201_CREATED)
def create_key(request: Request, admin: Admin, body: KeyCreate) -> KeyCreated:
    """A new API key. The key is in this answer only: imgsift keeps its hash."""
    if body.rate_limit is not None:
        from limits import parse

        try:
            parse(body.rate_limit)
        except ValueError:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"rate_limit {body.rate_limit!r}: write e.g. '600/minute'"
            ) from None
    record, key = _keys(request).create(body.name, admin=body.admin, rate_limit=body.rate_limit)
    return KeyCreated(**record.model_dump(), key=key)


@router.get("/keys", response_model=list[ApiKey])
def list_keys(request: Request, admin: Admin) -> list[ApiKey]:
    """Every key's record (never the keys)."""
    return _keys(request).list()


@router.delete("/keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_key(request: Request, admin: Admin, key_id: Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")]) -> Response:
    """Revoke a key at once; its jobs stay stored (and keep running) but no key can read them."""
    if key_id == admin.id:
        raise HTTPException(status.HTTP_409_CONFLICT, "a key cannot revoke itself; use another admin key")
    if not _keys(request).revoke(key_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no key with id {key_id!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/session", response_model=ApiKey)
def whoami(principal: Principal) -> ApiKey:
    """The calling key's record: who am I (the UI asks this to know whether it is signed in)."""
    return principal


@router.post("/session", response_model=ApiKey)
def sign_in(request: Request, response: Response, body: Login) -> ApiKey:
    """Sign the web UI in: the key goes into an HttpOnly, SameSite=Strict cookie that images and events can use."""
    record = _keys(request).lookup(body.api_key.get_secret_value())
    if record is None:
        raise unauthorized("unknown or revoked API key")
    response.set_cookie(
        SESSION_COOKIE,
        body.api_key.get_secret_value(),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=30 * 24 * 3600,
    )
    return record


@router.delete("/session", status_code=status.HTTP_204_NO_CONTENT)
def sign_out() -> Response:
    """Forget the UI's cookie."""
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict")
    return response
