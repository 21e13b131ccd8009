"""The OpenAPI 3 description of the HTTP API, served at GET /openapi.json.

It is built in Python from the running service's settings, so the limits it states (CLIP_MAX_PREDICTIONS,
MAX_IMAGE_BYTES, the default threshold) and those of the per-request options (options.py) are the ones
the service enforces. tests/test_openapi.py checks that it names exactly the app's routes and methods,
and runs schemathesis against the app from it.

The JSON shapes are exact (`additionalProperties: false`): a key the code adds must be added here too.
"""

from __future__ import annotations

from flask import Blueprint, jsonify

from clip_service.http.current import current_service
from clip_service.http.options import MAX_LABEL_CHARACTERS, MAX_REQUEST_LABELS
from clip_service.http.page import ASSETS
from clip_service.http.routes import OPEN_PATHS
from clip_service.http.search import MAX_QUERY_CHARACTERS
from clip_service.inputs.thumbnails import THUMBNAIL_SIDE
from clip_service.inputs.url_fetch import MAX_REDIRECTS, MAX_URL_LENGTH
from clip_service.settings import Settings
from clip_service.tasks.embed import ENCODINGS as EMBEDDING_ENCODINGS
from clip_service.tasks.search import DEFAULT_RESULTS, MAX_RESULTS

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


def _success(fields: dict, **extra) -> dict:
    """A 200 answer: the service's name and "success", then the route's own keys."""
    return _exact({"service": _const("clip"), "status": _const("success"), **fields}, **extra)


def _metadata(**fields) -> dict:
    """An answer's metadata: the seconds it took, then the route's own keys."""
    return _exact({"processing_time": {"type": "number", "minimum": 0, "description": "Seconds."},
                   **fields})


def _model_info_properties() -> dict:
    return {
        "framework": {"type": "string", "enum": ["OpenAI", "OpenCLIP"],
                      "description": "`OpenAI` for OpenAI's weights, `OpenCLIP` for every other model."},
        "model": {"type": "string", "description": "CLIP_MODEL as configured."},
        "device": {"type": "string", "example": "cpu"},
        "labels_version": {"type": "string", "pattern": "^[0-9a-f]{12}$",
                           "description": "The label set's version, as in GET /labels."},
    }


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
        "ModelInfo": _exact(_model_info_properties()),
        "AnalyzeSuccess": _success({
            "predictions": {"type": "array", "items": _ref("schemas", "Prediction"),
                            "maxItems": settings.max_predictions,
                            "description": "Sorted by confidence, highest first; at or above the "
                                           "threshold, at most `limit`."},
            "metadata": _metadata(model_info=_ref("schemas", "ModelInfo")),
        }, description="Every 200 answer of /analyze."),
        "BatchSuccess": _success({
            "results": {"type": "array", "maxItems": settings.batch_files_max,
                        "items": {"oneOf": [_ref("schemas", "AnalyzeSuccess"), _ref("schemas", "Error")]},
                        "description": "One answer per `file` field, in order: /analyze's own answer, or "
                                       "its error answer for a file that is not a usable image."},
            "metadata": _metadata(model_info=_ref("schemas", "ModelInfo")),
        }, description="Every 200 answer of /analyze/batch."),
        "EmbedSuccess": _success({
            "embeddings": {"oneOf": [
                {"type": "array", "items": {"type": "array", "items": {"type": "number"}},
                 "description": "`encoding=float`: each vector as numbers (float32 values)."},
                {"type": "array", "items": {"type": "string", "format": "byte"},
                 "description": "`encoding=base64`: each vector as base64 of `dimensions` little-endian "
                                "float32 values."},
            ], "description": "One unit vector per input, in input order."},
            "metadata": _metadata(model_info=_exact({
                **_model_info_properties(),
                "dimensions": {"type": "integer", "minimum": 1,
                               "description": "Numbers per vector (the model's embedding size)."},
            })),
        }, description="Every 200 answer of /embed."),
        "SearchSuccess": _success({
            "matches": {"type": "array", "maxItems": MAX_RESULTS, "items": _exact({
                "path": {"type": "string", "description": "Relative to the indexed folder, with `/`."},
                "score": {"type": "number", "minimum": -1, "maximum": 1,
                          "description": "Cosine similarity to the query, 4 decimals; higher is closer."},
            }), "description": "The best matches first, at most `k`."},
            "metadata": _metadata(
                index_size={"type": "integer", "minimum": 0, "description": "Images searched."},
                model_info=_ref("schemas", "ModelInfo")),
        }, description="Every 200 answer of /search."),
        "SearchIndex": _success({
            "index": _exact({
                "images": {"type": "integer", "minimum": 0},
                "dimensions": {"type": "integer", "minimum": 1},
                "model": {"type": "string", "description": "The CLIP_MODEL that made the index (a local-dir: "
                                                           "model by its folder's name)."},
            }),
        }),
        "Error": _exact({
            "service": _const("clip"),
            "status": _const("error"),
            "predictions": {"type": "array", "items": _ref("schemas", "Prediction"), "maxItems": 0},
            "error": _exact({"message": {
                "type": "string",
                "description": "What went wrong, for people; never a traceback or other internals."}}),
            "metadata": _metadata(),
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
        "Labels": _success({
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
        "NotFound": _error("`file` (or `file_path`) does not exist; any path this description does not "
                           "name."),
        "SearchOff": _error("Photo search is off: SEARCH_INDEX is not set."),
        "NotIndexed": _error("Photo search is off (SEARCH_INDEX is not set), the path is not in the index, "
                             "or its file is no longer in the indexed folder."),
        "ThumbnailForbidden": _error("The indexed path now leads outside the indexed folder (a symlink)."),
        "MethodNotAllowed": _error(
            "A method the route does not take (every route answers it so).",
            {"Allow": {"description": "The methods the route takes.", "required": True,
                       "schema": {"type": "string"}, "example": "GET, HEAD, OPTIONS"}}),
        "PayloadTooLarge": _error("The upload, the URL's body or the file is larger than MAX_IMAGE_BYTES (a "
                                  "body of several images: BATCH_FILES_MAX times MAX_IMAGE_BYTES)."),
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
        "RequestTimeout": _error("The request did not arrive whole within REQUEST_TIMEOUT of its first byte "
                                 "(the front door, under CLIP.sh)."),
        "LengthRequired": _error("The body was sent chunked; send it with a Content-Length."),
        "RequestLineTooLong": _error("The request line is over 8,190 bytes; send long parameters (such as "
                                     "labels) as POST form fields."),
        "HeadersTooLarge": _error("The request line and headers are over 64 KiB, or a header is over 8,190 "
                                  "bytes."),
        "TransferCodingNotImplemented": _error("A Transfer-Encoding other than chunked."),
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


# What the front door (http/front_door.py) answers itself on any route, before the app sees the request.
FRONT_DOOR_ANSWERS = {"408": "RequestTimeout", "411": "LengthRequired", "414": "RequestLineTooLong",
                      "431": "HeadersTooLarge", "501": "TransferCodingNotImplemented"}


def _responses(*codes: str, success: dict, bad_request: str = "BadQueryString",
               overrides: dict[str, str] | None = None) -> dict:
    """200, and 400 and the other error answers named by their codes.

    Every route answers 400 for a raw query string that is not UTF-8 (errors._query_string_is_utf8);
    /analyze for many more reasons (`bad_request="BadRequest"`).
    """
    names = {"400": bad_request, "401": "Unauthorized", "403": "Forbidden", "404": "NotFound",
             "413": "PayloadTooLarge", "500": "InternalError", "502": "BadGateway", "503": "Unavailable",
             "504": "Timeout", **FRONT_DOOR_ANSWERS}
    names.update(overrides or {})
    return {"200": success, **{code: _ref("responses", names[code])
                               for code in ("400", *codes, *FRONT_DOOR_ANSWERS)}}


ALIAS = ("The same as /analyze (same checks, options and answers), under the name the animal-farm "
         "orchestrator and its sibling services use.")


def _url_parameter(name: str) -> dict:
    return {"name": name, "in": "query", "required": False,
            "description": "An http or https URL of the image. Public addresses only unless URL_ALLOWLIST "
                           f"names the host; at most {MAX_REDIRECTS} redirects, each checked.",
            "schema": {"type": "string", "format": "uri", "maxLength": MAX_URL_LENGTH},
            "example": "https://example.com/cat.jpg"}


def _file_parameter(name: str) -> dict:
    return {"name": name, "in": "query", "required": False,
            "description": "An absolute path to an image on the server, under ALLOWED_FILE_ROOTS (with none: "
                           "any file when PRIVATE=True, none otherwise).",
            "schema": {"type": "string"}}


def _image_field(settings: Settings) -> dict:
    return {"type": "string", "format": "binary",
            "description": f"An image, at most MAX_IMAGE_BYTES ({settings.max_image_bytes} bytes): PNG, "
                           "JPEG, GIF (first frame), BMP or WebP, recognised by content."}


def _raw_image(settings: Settings) -> dict:
    """The request body as the image itself (Content-Type image/... or application/octet-stream)."""
    return {"schema": _image_field(settings)}


def _analyze_get(settings: Settings, operation: str, url_name: str | None, file_name: str | None,
                 alias: str = "") -> dict:
    names = [f"`{name}`" for name in (url_name, file_name) if name]
    places = (("at a URL", url_name), ("in a file on the server", file_name))
    where = " or ".join(place for place, name in places if name)
    rule = f"Give exactly one of {' and '.join(names)}, each at most once." if len(names) > 1 else \
        f"Give {names[0]} once."
    return {
        "operationId": operation, "tags": ["analysis"],
        "summary": f"Classify the image {where}",
        "description": " ".join(filter(None, [alias, rule])),
        "parameters": [*([_url_parameter(url_name)] if url_name else []),
                       *([_file_parameter(file_name)] if file_name else []),
                       *_option_parameters(settings, "query")],
        "responses": _responses(*(["401", "403"] + (["404"] if file_name else []) + ["413", "500"]
                                  + (["502"] if url_name else []) + ["503", "504"]),
                                success=_json(_ref("schemas", "AnalyzeSuccess"), "The predictions."),
                                bad_request="BadRequest"),
    }


def _analyze_post(settings: Settings, operation: str, alias: str = "") -> dict:
    return {
        "operationId": operation, "tags": ["analysis"],
        "summary": "Classify an uploaded image",
        "description": " ".join(filter(None, [
            alias, "The image is the multipart field `file`, or the whole body (Content-Type `image/...` or "
                   "`application/octet-stream`). The options may be query parameters or form fields, each "
                   "given once."])),
        "parameters": _option_parameters(settings, "query"),
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": _image_field(settings), **_option_properties(settings)},
            }},
            "image/*": _raw_image(settings),
            "application/octet-stream": _raw_image(settings),
        }},
        "responses": _responses("401", "413", "500", "503", "504",
                                success=_json(_ref("schemas", "AnalyzeSuccess"), "The predictions."),
                                bad_request="BadRequest"),
    }


def _analyze_batch(settings: Settings) -> dict:
    return {
        "operationId": "analyzeBatch", "tags": ["analysis"],
        "summary": "Classify several uploaded images in one forward pass",
        "description": f"Up to BATCH_FILES_MAX ({settings.batch_files_max}) `file` fields; the same options "
                       "as /analyze apply to every image. A file that is not a usable image gets its own "
                       "error answer in `results`; the others still succeed.",
        "parameters": _option_parameters(settings, "query"),
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {
                "file": {"type": "array", "minItems": 1, "maxItems": settings.batch_files_max,
                         "items": _image_field(settings)},
                **_option_properties(settings),
            },
        }}}},
        "responses": _responses("401", "413", "500", "503", "504",
                                success=_json(_ref("schemas", "BatchSuccess"), "One answer per image."),
                                bad_request="BadRequest"),
    }


def _embed_options(settings: Settings) -> list[dict]:
    return [
        {"name": "prompts", "in": "query", "required": False,
         "description": "Texts only: embed each text through the vocabulary's prompt templates, exactly as "
                        "/analyze scores a label (default false: the text as written).",
         "schema": {"type": "boolean", "default": False}},
        {"name": "encoding", "in": "query", "required": False,
         "description": "`float`: numbers; `base64`: each vector as base64 of little-endian float32 values.",
         "schema": {"type": "string", "enum": list(EMBEDDING_ENCODINGS), "default": "float"}},
    ]


EMBED_ANSWER = "One unit vector per input, in order."


def _embed_get(settings: Settings) -> dict:
    return {
        "operationId": "embedByReference", "tags": ["embeddings"],
        "summary": "Embed the image at a URL or in a server file, or texts",
        "description": "Give exactly one of `url`, `file` and `text` (which may repeat: at most "
                       f"{MAX_REQUEST_LABELS} texts, each at most {MAX_LABEL_CHARACTERS} characters).",
        "parameters": [
            _url_parameter("url"), _file_parameter("file"),
            {"name": "text", "in": "query", "required": False, "style": "form", "explode": True,
             "description": "A text to embed; repeat the parameter for several.",
             "schema": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_REQUEST_LABELS}},
            *_embed_options(settings),
        ],
        "responses": _responses("401", "403", "404", "413", "500", "502", "503", "504",
                                success=_json(_ref("schemas", "EmbedSuccess"), EMBED_ANSWER),
                                bad_request="BadRequest"),
    }


def _embed_post(settings: Settings) -> dict:
    return {
        "operationId": "embedPosted", "tags": ["embeddings"],
        "summary": "Embed uploaded images, or texts",
        "description": f"Images: up to BATCH_FILES_MAX ({settings.batch_files_max}) `file` fields, one "
                       "forward pass (or one image as the whole body); texts: a JSON object. `prompts` and "
                       "`encoding` may be query parameters, or keys of the JSON object.",
        "parameters": _embed_options(settings),
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "array", "minItems": 1, "maxItems": settings.batch_files_max,
                                        "items": _image_field(settings)}},
            }},
            "application/json": {"schema": _exact({
                "texts": {"type": "array", "minItems": 1, "maxItems": MAX_REQUEST_LABELS,
                          "items": {"type": "string", "minLength": 1, "maxLength": MAX_LABEL_CHARACTERS}},
                "prompts": {"type": "boolean", "default": False},
                "encoding": {"type": "string", "enum": list(EMBEDDING_ENCODINGS), "default": "float"},
            }, required=["texts"]), "example": {"texts": ["a dog on a beach", "a red circle"]}},
            "image/*": _raw_image(settings),
            "application/octet-stream": _raw_image(settings),
        }},
        "responses": _responses("401", "413", "500", "503", "504",
                                success=_json(_ref("schemas", "EmbedSuccess"), EMBED_ANSWER),
                                bad_request="BadRequest"),
    }


def _search_thumbnail() -> dict:
    return {
        "operationId": "searchThumbnail", "tags": ["search"],
        "summary": "A small JPEG of an indexed photo (for search results)",
        "description": f"At most {THUMBNAIL_SIDE} pixels on its longer side. Only paths the index holds, "
                       "read beneath the indexed folder with the same checks as `file`.",
        "parameters": [{"name": "path", "in": "query", "required": True,
                        "description": "A `path` from a /search answer.",
                        "schema": {"type": "string", "minLength": 1}, "example": "holiday/beach.jpg"}],
        "responses": _responses(
            "401", "403", "404", "413", "500", "503", "504",
            overrides={"403": "ThumbnailForbidden", "404": "NotIndexed"}, bad_request="BadRequest",
            success={"description": "The thumbnail.",
                     "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}),
    }


def _search_get() -> dict:
    return {
        "operationId": "searchByText", "tags": ["search"],
        "summary": "The indexed photos that best match a description",
        "parameters": [
            {"name": "q", "in": "query", "required": True,
             "description": f"What to look for, at most {MAX_QUERY_CHARACTERS} characters.",
             "schema": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARACTERS},
             "example": "a dog on a beach"},
            _results_parameter(),
        ],
        "responses": _responses("401", "404", "500", "503", "504", overrides={"404": "SearchOff"},
                                success=_json(_ref("schemas", "SearchSuccess"), "The best matches."),
                                bad_request="BadRequest"),
    }


def _results_parameter() -> dict:
    return {"name": "k", "in": "query", "required": False, "description": "How many matches.",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_RESULTS, "default": DEFAULT_RESULTS}}


def _search_post(settings: Settings) -> dict:
    return {
        "operationId": "searchByPhoto", "tags": ["search"],
        "summary": "The indexed photos that look most like an uploaded photo",
        "description": "The photo is the multipart field `file`, or the whole body (Content-Type "
                       "`image/...` or `application/octet-stream`).",
        "parameters": [_results_parameter()],
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                               "properties": {"file": _image_field(settings)}}},
            "image/*": _raw_image(settings),
            "application/octet-stream": _raw_image(settings),
        }},
        "responses": _responses("401", "404", "413", "500", "503", "504", overrides={"404": "SearchOff"},
                                success=_json(_ref("schemas", "SearchSuccess"), "The best matches."),
                                bad_request="BadRequest"),
    }


def openapi_description(settings: Settings | None = None) -> dict:
    """The OpenAPI 3 description of the service configured by `settings` (default: the defaults)."""
    settings = settings or Settings()
    description = {
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
        "tags": [{"name": name} for name in ("analysis", "embeddings", "search", "vocabulary", "operations")],
        "security": [{}, {"bearerAuth": []}],
        "paths": {
            "/": {"get": {
                "operationId": "webPage", "tags": ["operations"], "summary": "The web page",
                "description": "An HTML page, with its stylesheet and script below, that calls /analyze "
                               "from the browser.",
                "responses": _responses("500", success={
                    "description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}}),
            }},
            **{f"/static/{name}": {"get": {
                "operationId": f"webPage{name.split('.')[1].upper()}", "tags": ["operations"],
                "summary": f"The page's {'stylesheet' if name.endswith('css') else 'script'}",
                "responses": _responses("500", success={
                    "description": "The file.", "content": {mimetype: {"schema": {"type": "string"}}}}),
            }} for name, mimetype in ASSETS.items()},
            "/health": {"get": {
                "operationId": "health", "tags": ["operations"], "summary": "Readiness",
                "responses": {
                    **_responses("500", success=_json(_ref("schemas", "HealthReady"),
                                                      "The model is loaded and inference works.")),
                    "503": _json(_ref("schemas", "HealthNotReady"),
                                 "Loading, failed to load, or inference failing (no Retry-After)."),
                },
            }},
            "/analyze": {"get": _analyze_get(settings, "analyzeByReference", "url", "file"),
                         "post": _analyze_post(settings, "analyzeUpload")},
            "/v3/analyze": {
                "get": _analyze_get(settings, "analyzeByReferenceV3", "url", "file", ALIAS),
                "post": _analyze_post(settings, "analyzeUploadV3", ALIAS),
            },
            "/v2/analyze": {"get": _analyze_get(settings, "analyzeUrlV2", "image_url", None, ALIAS)},
            "/v2/analyze_file": {"get": _analyze_get(settings, "analyzeFileV2", None, "file_path", ALIAS)},
            "/analyze/batch": {"post": _analyze_batch(settings)},
            "/embed": {"get": _embed_get(settings), "post": _embed_post(settings)},
            "/search": {"get": _search_get(), "post": _search_post(settings)},
            "/search/index": {"get": {
                "operationId": "searchIndex", "tags": ["search"], "summary": "What the photo index holds",
                "responses": _responses("401", "404", "500", "503",
                                        success=_json(_ref("schemas", "SearchIndex"), "The index."),
                                        overrides={"404": "SearchOff"}),
            }},
            "/search/thumbnail": {"get": _search_thumbnail()},
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
    for path in OPEN_PATHS:  # the routes that need no key, as http/routes.py declares them
        for operation in description["paths"][path].values():
            operation["security"] = []
    return description


@openapi_bp.get("/openapi.json")
def openapi_json():
    return jsonify(openapi_description(current_service().settings))
