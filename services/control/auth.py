"""Bearer-token authentication of the /v1 routes, and the rule that an open service binds to loopback only."""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.common.transport import is_loopback
from services.control.errors import ApiError

TOKEN_ENV = "ATOMO_API_TOKEN"
_SCHEME = HTTPBearer(auto_error=False, description="the API token (ATOMO_API_TOKEN)")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="atomo"'}


def load_token(token_file: str | None = None) -> str | None:
    """The API token: from ATOMO_API_TOKEN, else from `token_file`; None when neither is given."""
    token = os.environ.get(TOKEN_ENV)
    if not token and token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
    return token or None


def check_bind(host: str, token: str | None, allow_open: bool) -> None:
    """Refuse to serve without a token on a non-loopback address unless explicitly allowed."""
    if token is None and not is_loopback(host) and not allow_open:
        raise ValueError(
            f"refusing to bind {host} without an API token: set {TOKEN_ENV} or --token-file, bind 127.0.0.1, "
            "or pass --allow-unauthenticated to serve an open API on the network"
        )


def bearer_dependency(token: str | None):
    """A FastAPI dependency that checks `Authorization: Bearer <token>` in constant time (no-op without token)."""
    expected = None if token is None else token.encode()

    async def require(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_SCHEME)]) -> None:
        if expected is None:
            return
        given = b"" if credentials is None else credentials.credentials.encode()
        if not hmac.compare_digest(given, expected):
            message = "missing bearer token" if credentials is None else "invalid bearer token"
            raise ApiError(401, message, None, _CHALLENGE)

    return require
