"""A small httpx client of the control service's REST API (used by the `atomo` commands and the tests)."""

from __future__ import annotations

import os
from urllib.parse import quote

import httpx

URL_ENV, TOKEN_ENV = "ATOMO_URL", "ATOMO_API_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8080"


def resolve_url(url: str | None = None) -> str:
    """The service URL a client uses: `url`, else $ATOMO_URL, else DEFAULT_URL (no trailing slash)."""
    return (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


def _run_path(run_id: str, suffix: str = "") -> str:
    return f"/v1/runs/{quote(run_id, safe='')}{suffix}"


class ApiError(Exception):
    """The service answered with an error; `code`, `message` and `details` are its error object's."""

    def __init__(self, status: int, code: str, message: str, details=None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, timeout_s: float = 30.0):
        self.url = resolve_url(url)
        token = token or os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.is_error:
            try:
                error = response.json()["error"]
                raise ApiError(response.status_code, error["code"], error["message"], error.get("details"))
            except (ValueError, KeyError, TypeError):
                raise ApiError(response.status_code, "http_error", response.text[:200]) from None
        return response

    def submit(self, spec: dict | None = None) -> dict:
        return self._request("POST", "/v1/runs", json=spec or {}).json()

    def runs(self, state: list[str] | None = None, limit: int = 50, page_token: str | None = None) -> dict:
        params = {"limit": limit, **({"state": state} if state else {})}
        if page_token:
            params["page_token"] = page_token
        return self._request("GET", "/v1/runs", params=params).json()

    def run(self, run_id: str) -> dict:
        return self._request("GET", _run_path(run_id)).json()

    def metrics(self, run_id: str, since: int = -1, limit: int = 1000) -> dict:
        params = {"since": since, "limit": limit}
        return self._request("GET", _run_path(run_id, "/metrics"), params=params).json()

    def events(self, run_id: str, since: int = 0) -> dict:
        return self._request("GET", _run_path(run_id, "/events"), params={"since": since}).json()

    def cancel(self, run_id: str) -> dict:
        return self._request("POST", _run_path(run_id, "/cancel")).json()

    def checkpoint(self, run_id: str) -> bytes:
        return self._request("GET", _run_path(run_id, "/checkpoint")).content

    def cluster(self) -> dict:
        return self._request("GET", "/v1/cluster").json()

    def ready(self) -> bool:
        """Whether /readyz says ready (False while the service is not even listening)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False
