"""The OpenAPI 3 description of the HTTP API, served at GET /openapi.json.

It is built in Python from the running service's settings, so the limits it states (CLIP_MAX_PREDICTIONS,
MAX_IMAGE_BYTES, the default threshold) and those of the per-request options (options.py) are the ones
the service enforces. tests/test_openapi.py checks that it names exactly the app's routes and methods,
and runs schemathesis against the app from it.

The JSON shapes are exact (`additionalProperties: false`): a key the code adds must be added here too.
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from clip_service.http.options import MAX_LABEL_CHARACTERS, MAX_REQUEST_LABELS
from clip_service.http.page import ASSETS
from clip_service.inputs.url_fetch import MAX_REDIRECTS, MAX_URL_LENGTH
from clip_service.settings import Settings

OPENAPI_VERSION = "3.0.3"
API_VERSION = "1.0.0"
JSON = "application/json"

openapi_bp = Blueprint("openapi", __name__)


def _ref(kind: str, name: str) -> dict:
    return {"$ref": f"#/components/{kind}/{name}"}


def _const(value: str) -> dict:
    return {"type": "string", "enum": [value]}


def _exact(properties: dict, required: list[str] | None = None, **extra) -> dict:
    """An object with exactly these keys (all required unless `required` says which)."""
    return {"type": "object", "additionalProperties": False,
            "required": list(properties) if required is None else required, "properties": properties,
            **extra}


def _json(schema: dict, description: str, headers: dict | None = None) -> dict:
    response = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _schemas(settings: Settings) -> dict:
    prediction = _exact({
        "label": {"type": "string", "description": "As shown to clients (the text before `|` in a "
                                                   "label file)."},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1,
                       "description": "Rounded to 3 decimals."},
        "emoji": {"type": "string", "description": "Absent when the label has no known emoji."},
    }, required=["label", "confidence"])
    return {
        "Prediction": prediction,
        "ModelInfo": _exact({
            "framework": {"type": "string", "enum": ["OpenAI", "OpenCLIP"],
                          "description": "`OpenAI` for OpenAI's weights, `OpenCLIP` for every other model."},
            "model": {"type": "string", "description": "CLIP_MODEL as configured."},
            "device": {"type": "string", "example": "cpu"},
            "labels_version": {"type": "string", "pattern": "^[0-9a-f]{12}$",
                               "description": "The label set's version, as in GET /labels."},
        }),
        "AnalyzeSuccess": _exact({
            "service": _const("clip"),
            "status": _const("success"),
            "predictions": {"type": "array", "items": _ref("schemas", "Prediction"),
                            "maxItems": settings.max_predictions,
                            "description": "Sorted by confidence, highest first; at or above the "
                                           "threshold, at most `limit`."},
            "metadata": _exact({
                "processing_time": {"type": "number", "minimum": 0, "description": "Seconds."},
                "model_info": _ref("schemas", "ModelInfo"),
            }),
        }, description="Every 200 answer of /analyze."),
        "Error": _exact({
            "service": _const("clip"),
            "status": _const("error"),
            "predictions": {"type": "array", "items": _ref("schemas", "Prediction"), "maxItems": 0},
            "error": _exact({"message": {
                "type": "string",
                "description": "What went wrong, for people; never a traceback or other internals."}}),
            "metadata": _exact({"processing_time": {"type": "number", "minimum": 0,
                                                    "description": "Seconds."}}),
        }, description="Every error answer (4xx and 5xx) of every route but /health."),
        "HealthReady": _exact({
            "status": _const("healthy"),
            "model_status": _const("loaded"),
            "device": {"type": "string", "example": "cpu"},
            "num_labels": {"type": "integer", "minimum": 0},
            "model": {"type": "string", "description": "CLIP_MODEL as configured."},
        }),
        "HealthNotReady": {"oneOf": [
            _exact({
                "status": _const("unhealthy"),
                "model_status": {"type": "string", "enum": ["loading", "failed"]},
                "device": {"type": "string", "nullable": True, "description": "null until loaded."},
                "num_labels": {"type": "integer", "minimum": 0, "maximum": 0},
                "error": {"type": "string", "description": "Why loading failed (with `failed`)."},
            }, required=["status", "model_status", "device", "num_labels"],
                description="The model is still loading, or failed to load."),
            _exact({
                "status": _const("unhealthy"),
                "model_status": _const("loaded"),
                "device": {"type": "string"},
                "num_labels": {"type": "integer", "minimum": 0},
                "model": {"type": "string"},
                "error": {"type": "string", "description": "Inference is failing: ..."},
            }, description="The model is loaded but inference (the canary or a request) fails."),
        ]},
        "LabelEntry": _exact({
            "label": {"type": "string"},
            "emoji": {"type": "string", "description": "Absent when the label has no known emoji."},
        }, required=["label"]),
        "Labels": _exact({
            "service": _const("clip"),
            "status": _const("success"),
            "version": {"type": "string", "pattern": "^[0-9a-f]{12}$",
                        "description": "A short hash of the model, templates and labels; every "
                                       "/analyze answer carries it as metadata.model_info.labels_version."},
            "num_labels": {"type": "integer", "minimum": 0},
            "templates": {"type": "array", "items": {"type": "string"},
                          "description": "The prompt templates, `{}` standing for the label."},
            "groups": {"type": "object", "description": "Label file name (without .txt) -> its labels.",
                       "additionalProperties": {"type": "array", "items": _ref("schemas", "LabelEntry")}},
        }),
    }


def _error(description: str, headers: dict | None = None) -> dict:
    return _json(_ref("schemas", "Error"), description, headers)


def _error_responses() -> dict:
    return {
        "BadRequest": _error("Bad input: a query string that is not valid UTF-8, no input or more than one, "
                             "a parameter given twice, a bad option value (the message names it), a "
                             "malformed URL or one not http/https, a relative path or NUL byte in `file`, a "
                             "POST that is not multipart/form-data or has no (or two) `file` fields, bytes "
                             "that are not a supported image (PNG, JPEG, GIF, BMP, WebP), a truncated image, "
                             "or more pixels than MAX_IMAGE_PIXELS."),
        "BadQueryString": _error("The query string is not valid UTF-8 (raw bytes; percent-encode the "
                                 "values)."),
        "Unauthorized": _error("API_KEY is set and the request has no `Authorization: Bearer <key>` header "
                               "or a wrong key."),
        "Forbidden": _error("`file` outside ALLOWED_FILE_ROOTS or not readable, file input disabled (a "
                            "public service with no ALLOWED_FILE_ROOTS), or a URL whose host resolves (on "
                            "any redirect hop) to a loopback, private, link-local, multicast, reserved or "
                            "unspecified address not in URL_ALLOWLIST."),
        "NotFound": _error("`file` does not exist (on /analyze); any path this description does not name."),
        "MethodNotAllowed": _error(
            "A method the route does not take (every route answers it so).",
            {"Allow": {"description": "The methods the route takes.", "required": True,
                       "schema": {"type": "string"}, "example": "GET, HEAD, OPTIONS"}}),
        "PayloadTooLarge": _error("The upload, the URL's body or the file is larger than MAX_IMAGE_BYTES."),
        "InternalError": _error("An unexpected failure (a bug, or a model that fails on its device); the "
                                "message never holds internals, the log has the traceback."),
        "BadGateway": _error("The URL could not be fetched: DNS failure, refused connection, an answer other "
                             f"than 200, more than {MAX_REDIRECTS} redirects, slower than URL_TIMEOUT."),
        "Unavailable": _error(
            "The model is still loading or failed to load (the message says which), or more than MAX_QUEUE "
            "requests are in progress in this worker.",
            {"Retry-After": {"description": "Seconds to wait before retrying.", "required": True,
                             "schema": {"type": "integer", "minimum": 0}}}),
        "Timeout": _error("The request took longer than REQUEST_TIMEOUT."),
    }


def _option_parameters(settings: Settings, where: str) -> list[dict]:
    return [
        {"name": "threshold", "in": where, "required": False,
         "description": "Minimum confidence for this request (default CLIP_CONFIDENCE_THRESHOLD).",
         "schema": {"type": "number", "minimum": 0, "maximum": 1, "default": settings.confidence_threshold}},
        {"name": "limit", "in": where, "required": False,
         "description": "At most this many predictions (default and largest: CLIP_MAX_PREDICTIONS).",
         "schema": {"type": "integer", "minimum": 1, "maximum": settings.max_predictions,
                    "default": settings.max_predictions}},
        {"name": "labels", "in": where, "required": False,
         "description": "Comma-separated labels to classify against instead of the vocabulary: at most "
                        f"{MAX_REQUEST_LABELS} (after dropping duplicates), each at most "
                        f"{MAX_LABEL_CHARACTERS} characters. Not together with `groups`.",
         "schema": {"type": "string"}, "example": "cat,dog,red fox"},
        {"name": "groups", "in": where, "required": False,
         "description": "Comma-separated label groups (the files in labels/, see GET /labels): only "
                        "their labels. An unknown group is a 400 that lists the known ones. Not together "
                        "with `labels`.",
         "schema": {"type": "string"}},
    ]


def _option_properties(settings: Settings) -> dict:
    return {p["name"]: {**p["schema"], "description": p["description"]}
            for p in _option_parameters(settings, "query")}


def _responses(*codes: str, success: dict, bad_request: str = "BadQueryString") -> dict:
    """200, and 400 and the other error answers named by their codes.

    Every route answers 400 for a raw query string that is not UTF-8 (errors._query_string_is_utf8);
    /analyze for many more reasons (`bad_request="BadRequest"`).
    """
    names = {"400": bad_request, "401": "Unauthorized", "403": "Forbidden", "404": "NotFound",
             "413": "PayloadTooLarge", "500": "InternalError", "502": "BadGateway", "503": "Unavailable",
             "504": "Timeout"}
    return {"200": success, **{code: _ref("responses", names[code]) for code in ("400", *codes)}}


def openapi_description(settings: Settings | None = None) -> dict:
    """The OpenAPI 3 description of the service configured by `settings` (default: the defaults)."""
    settings = settings or Settings()
    analyzed = _json(_ref("schemas", "AnalyzeSuccess"), "The predictions.")
    open_route = {"security": []}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "clip-service",
            "version": API_VERSION,
            "description": "Tells what is in an image with CLIP: the most likely labels of a vocabulary "
                           "(or of the request's own labels), their confidences and an emoji for each.\n\n"
                           "Every error answer has the `Error` shape; any path not named here is a 404 and "
                           "any other method a 405, in that shape. With API_KEY set, every route but "
                           "`/`, `/static/...`, `/health` and `/openapi.json` needs "
                           "`Authorization: Bearer <key>`.",
        },
        "tags": [{"name": "analysis"}, {"name": "vocabulary"}, {"name": "operations"}],
        "security": [{}, {"bearerAuth": []}],
        "paths": {
            "/": {"get": {
                "operationId": "webPage", "tags": ["operations"], "summary": "The web page",
                "description": "An HTML page, with its stylesheet and script below, that calls /analyze "
                               "from the browser.",
                **open_route,
                "responses": _responses("500", success={
                    "description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}}),
            }},
            **{f"/static/{name}": {"get": {
                "operationId": f"webPage{name.split('.')[1].upper()}", "tags": ["operations"],
                "summary": f"The page's {'stylesheet' if name.endswith('css') else 'script'}",
                **open_route,
                "responses": _responses("500", success={
                    "description": "The file.", "content": {mimetype: {"schema": {"type": "string"}}}}),
            }} for name, mimetype in ASSETS.items()},
            "/health": {"get": {
                "operationId": "health", "tags": ["operations"], "summary": "Readiness",
                **open_route,
                "responses": {
                    **_responses("500", success=_json(_ref("schemas", "HealthReady"),
                                                      "The model is loaded and inference works.")),
                    "503": _json(_ref("schemas", "HealthNotReady"),
                                 "Loading, failed to load, or inference failing (no Retry-After)."),
                },
            }},
            "/analyze": {
                "get": {
                    "operationId": "analyzeByReference", "tags": ["analysis"],
                    "summary": "Classify the image at a URL or in a file on the server",
                    "description": "Give exactly one of `url` and `file`, each at most once.",
                    "parameters": [
                        {"name": "url", "in": "query", "required": False,
                         "description": "An http or https URL of the image. Public addresses only unless "
                                        f"URL_ALLOWLIST names the host; at most {MAX_REDIRECTS} redirects, "
                                        "each checked.",
                         "schema": {"type": "string", "format": "uri", "maxLength": MAX_URL_LENGTH},
                         "example": "https://example.com/cat.jpg"},
                        {"name": "file", "in": "query", "required": False,
                         "description": "An absolute path to an image on the server, under "
                                        "ALLOWED_FILE_ROOTS (with none: any file when PRIVATE=True, none "
                                        "otherwise).",
                         "schema": {"type": "string"}},
                        *_option_parameters(settings, "query"),
                    ],
                    "responses": _responses("401", "403", "404", "413", "500", "502", "503", "504",
                                            success=analyzed, bad_request="BadRequest"),
                },
                "post": {
                    "operationId": "analyzeUpload", "tags": ["analysis"],
                    "summary": "Classify an uploaded image",
                    "description": "The options may be query parameters or form fields, each given once.",
                    "parameters": _option_parameters(settings, "query"),
                    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                        "type": "object", "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary",
                                     "description": "The image, at most MAX_IMAGE_BYTES "
                                                    f"({settings.max_image_bytes} bytes): PNG, JPEG, GIF "
                                                    "(first frame), BMP or WebP, recognised by content."},
                            **_option_properties(settings),
                        },
                    }}}},
                    "responses": _responses("401", "413", "500", "503", "504", success=analyzed,
                                            bad_request="BadRequest"),
                },
            },
            "/labels": {"get": {
                "operationId": "labels", "tags": ["vocabulary"],
                "summary": "The loaded labels by group, with emoji, templates and version",
                "responses": _responses("401", "500", "503", success=_json(_ref("schemas", "Labels"),
                                                                            "The vocabulary.")),
            }},
            "/metrics": {"get": {
                "operationId": "metrics", "tags": ["operations"], "summary": "Prometheus metrics",
                "description": "Summed over all gunicorn workers.",
                "responses": _responses("401", "500", success={
                    "description": "The Prometheus text format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}),
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi", "tags": ["operations"], "summary": "This description",
                **open_route,
                "responses": _responses("500", success=_json({"type": "object"}, "OpenAPI 3.0.")),
            }},
        },
        "components": {
            "schemas": _schemas(settings),
            "responses": _error_responses(),
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "Only when API_KEY is set: `Authorization: Bearer <API_KEY>`.",
            }},
        },
    }


@openapi_bp.get("/openapi.json")
def openapi_json():
    return jsonify(openapi_description(current_app.extensions["clip_service"].settings))
