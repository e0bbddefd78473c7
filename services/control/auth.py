"""Bearer-token authentication of the /v1 routes, and the rule that an open service binds to loopback only."""

from __future__ import annotations

import hmac
import os
import secrets
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


def stored_token(path: str | Path, rotate: bool = False) -> tuple[str, bool]:
    """(token, reused): the token kept in `path`, or a new one written there (mode 0600) if the file is
    missing or empty, or `rotate` asks for a new one. `atomo up` keeps it in its state directory so that an
    exported ATOMO_API_TOKEN still works after a restart."""
    path = Path(path)
    if not rotate:
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            token = ""
        if token:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)  # a copy made readable by others is made private again
            return token, True
    token = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # O_CREAT keeps an existing file's mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token, False


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
