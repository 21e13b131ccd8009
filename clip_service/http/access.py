"""Who may call the service: an optional API key, the Host names it answers to, and which browser
origins may use it.

A browser is the client to distrust by default: any page a user visits can send requests to a
service on the user's own machine. So cross-origin requests are refused before any work is done
(an allowed origin in CORS_ORIGINS is the exception), and a Host header outside ALLOWED_HOSTS gets
no answer, which defeats DNS rebinding (a page's own name made to point at 127.0.0.1).
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from flask import Flask, request

from clip_service.errors import Forbidden, ServiceError
from clip_service.http.routes import OPEN_PATHS, is_open

# OPEN_PATHS: the routes without a key, declared in http/routes.py
__all__ = ["OPEN_PATHS", "MisdirectedHost", "Unauthorized", "host_name", "install_access_control"]
# A page's subresource requests say where they come from even without an Origin header.
FOREIGN_FETCH_SITES = {"cross-site", "same-site"}


class Unauthorized(ServiceError):
    status = 401
    headers = {"WWW-Authenticate": 'Bearer realm="clip-service"'}


class MisdirectedHost(ServiceError):
    status = 400


def host_name(host: str) -> str:
    """A Host header's name without its port: `[::1]:7778` -> `::1`, `Example.COM.` -> `example.com`."""
    name = urlsplit(f"//{host}").hostname or ""
    return name.rstrip(".").lower()


def install_access_control(app: Flask, api_key: str, cors_origins: tuple[str, ...],
                           allowed_hosts: tuple[str, ...] = ("*",)) -> None:
    key = api_key.encode()
    any_host = "*" in allowed_hosts

    @app.before_request
    def _require_allowed_host():
        if not any_host and host_name(request.host) not in allowed_hosts:
            raise MisdirectedHost(f"This service does not answer to the host name "
                                  f"{host_name(request.host)!r}; the operator can add it to ALLOWED_HOSTS")

    @app.before_request
    def _refuse_foreign_pages():
        if is_open(request.method, request.path):
            return None
        origin = request.headers.get("Origin")
        if origin is not None:
            if urlsplit(origin).netloc.lower() == request.host.lower() or _origin_allowed(origin):
                return None
            raise Forbidden(f"Requests from pages at {origin[:100]} are refused; the operator can allow "
                            "that origin in CORS_ORIGINS")
        if request.headers.get("Sec-Fetch-Site") in FOREIGN_FETCH_SITES:
            raise Forbidden("Requests from other sites' pages are refused; the operator can allow an "
                            "origin in CORS_ORIGINS")
        return None

    def _origin_allowed(origin: str) -> bool:
        return "*" in cors_origins or origin in cors_origins

    @app.before_request
    def _require_key():
        if not key or is_open(request.method, request.path):
            return None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key):
            raise Unauthorized("Missing or wrong API key; send the header Authorization: Bearer <key>")
        return None

    @app.after_request
    def _headers(response):
        response.headers["X-Content-Type-Options"] = "nosniff"
        origin = request.headers.get("Origin")
        if origin and _origin_allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in cors_origins else origin
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
        if "*" not in cors_origins:
            response.vary.add("Origin")
        return response
