"""API keys: ``--api-key`` for every endpoint but /health, ``--admin-key`` for POST /v1/dsla.

Keys travel as OpenAI clients send them, ``Authorization: Bearer KEY``. The admin key also opens
every other endpoint. Without an admin key the admin endpoint answers loopback clients only: changing
the conversion level, or folding every running sequence, is an operator's act. Behind a reverse
proxy every client looks local unless the proxy sends ``X-Forwarded-For`` (uvicorn trusts it from
127.0.0.1 by default): set an admin key there.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from fastapi import Request

from dsla_serve.serving.api.protocol import ApiError


@dataclass(frozen=True)
class Keys:
    api: str | None = None  # None: the API is open
    admin: str | None = None  # None: POST /v1/dsla from loopback clients only

    def __post_init__(self) -> None:
        for name, key in (("api key", self.api), ("admin key", self.admin)):
            if key is not None and not key.strip():
                raise ValueError(f"the {name} is empty: give a non-empty key or none")


def bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def same(a: str | None, b: str | None) -> bool:
    """Constant-time comparison: the time taken must not tell how much of a guessed key was right."""
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped IPv6 loopback address (a dual-stack socket's view of 127.0.0.1)."""
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def check_api(request: Request, keys: Keys) -> None:
    """Every endpoint but /health: the API key (or the admin key) when the server has one."""
    if keys.api is None:
        return
    token = bearer(request)
    if token is None:
        raise unauthorized("this server needs an API key: send the header 'Authorization: Bearer KEY'")
    if not (same(token, keys.api) or same(token, keys.admin)):
        raise unauthorized("the API key is not valid for this server")


def check_admin(request: Request, keys: Keys) -> None:
    """POST /v1/dsla: the admin key; without one configured, an API-key check and a loopback client."""
    if keys.admin is None:
        check_api(request, keys)
        host = request.client.host if request.client else None
        if not is_loopback(host):
            raise ApiError(403, f"{request.method} {request.url.path} answers only loopback clients on a server "
                                "without --admin-key; run it on the server's host or start the server with an admin "
                                "key", "permission_denied")  # fmt: skip
        return
    token = bearer(request)
    if same(token, keys.admin):
        return
    if token is None:
        raise unauthorized(f"{request.url.path} needs the admin key: send the header 'Authorization: Bearer KEY'")
    if same(token, keys.api):
        raise ApiError(403, f"{request.method} {request.url.path} needs the admin key, not the API key",
                       "permission_denied")  # fmt: skip
    raise unauthorized("the key is not valid for this server")
