"""/search: the indexed photos nearest a description or an uploaded photo; /search/index says what
the index holds; /search/thumbnail serves small previews of indexed photos. Parse, call, serialise.

Paths in answers are relative to the indexed folder: the server's own paths are never shown.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from clip_service.errors import BadInput
from clip_service.http.analyze import uploads
from clip_service.http.bodies import index_body, search_body
from clip_service.http.current import admitted, current_service
from clip_service.http.errors import elapsed
from clip_service.http.logs import set_input_kind
from clip_service.http.options import single_value
from clip_service.ranges import parse_in_range
from clip_service.tasks.search import DEFAULT_RESULTS, MAX_RESULTS

search_bp = Blueprint("search", __name__)

MAX_QUERY_CHARACTERS = 300
THUMBNAIL_CACHE = "private, max-age=3600"  # an indexed photo changes rarely; the browser keeps it


def results_wanted() -> int:
    raw = single_value(request.values.getlist, "k")
    if raw is None:
        return DEFAULT_RESULTS
    try:
        return parse_in_range(raw, int, 1, MAX_RESULTS)
    except ValueError as error:
        raise BadInput(f"k={error}") from None


def query_text() -> str:
    raw = single_value(request.args.getlist, "q")
    text = " ".join((raw or "").split())
    if not text:
        raise BadInput("Give q, what to look for, e.g. /search?q=a+dog+on+a+beach (or POST a photo)")
    if len(text) > MAX_QUERY_CHARACTERS:
        raise BadInput(f"q is {len(text)} characters; the limit is {MAX_QUERY_CHARACTERS}")
    return text


@search_bp.route("/search", methods=["GET", "POST"])
def search():
    service = current_service()
    with admitted() as deadline:
        k = results_wanted()
        if request.method == "POST":
            if "q" in request.args:
                raise BadInput("Give q (GET) or a photo (POST), not both")
            data = uploads(1)[0]
            set_input_kind("upload")
            index = service.photo_index()  # refuse before decoding when search is off or not ready
            query = service.embed([data], deadline)[0]
        else:
            text = query_text()
            set_input_kind("text")
            index = service.photo_index()
            query = service.embed_texts([text], prompts=False, deadline=deadline)[0]
        matches = service.search(index, query, k)  # one index for the answer: SIGHUP may swap it meanwhile
    return jsonify(search_body(matches, index, service.ready_classifier(), elapsed()))


@search_bp.get("/search/index")
def index_info():
    service = current_service()
    return jsonify(index_body(service.photo_index()))


@search_bp.get("/search/thumbnail")
def thumbnail():
    service = current_service()
    with admitted() as deadline:
        path = single_value(request.args.getlist, "path")
        if not path:
            raise BadInput("Give path, a path from a search answer, e.g. ?path=holiday/beach.jpg")
        set_input_kind("file")
        data = service.thumbnail(path, deadline)
    response = Response(data, mimetype="image/jpeg")
    response.headers["Cache-Control"] = THUMBNAIL_CACHE
    return response
