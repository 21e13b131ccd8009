"""Who may call the service: an optional API key, and which browser origins may read answers."""

from __future__ import annotations

import hmac

from flask import Flask, request

from clip_service.errors import ServiceError

OPEN_PATHS = {"/health", "/", "/openapi.json"}  # probes, the static page and the API description: no data


class Unauthorized(ServiceError):
    status = 401
    headers = {"WWW-Authenticate": 'Bearer realm="clip-service"'}


def install_access_control(app: Flask, api_key: str, cors_origins: tuple[str, ...]) -> None:
    key = api_key.encode()

    @app.before_request
    def _require_key():
        if not key or request.method == "OPTIONS" or request.path in OPEN_PATHS:
            return None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key):
            raise Unauthorized("Missing or wrong API key; send the header Authorization: Bearer <key>")
        return None

    @app.after_request
    def _cors(response):
        origin = request.headers.get("Origin")
        if origin and ("*" in cors_origins or origin in cors_origins):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in cors_origins else origin
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
        if "*" not in cors_origins:
            response.vary.add("Origin")
        return response
