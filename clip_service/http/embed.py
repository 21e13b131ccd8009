"""/embed: the request's images or texts as CLIP's unit vectors. Parse, call the service, serialise.

Images come as /analyze takes them (`?url=`, `?file=`, or a POST whose `file` field may repeat up to
BATCH_FILES_MAX times); texts as `?text=` (repeatable) or a JSON POST `{"texts": [...]}`. Exactly one
kind of input per request. Options: `prompts` (texts only) and `encoding` (`float` or `base64`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flask import Blueprint, jsonify, request

from clip_service.errors import BadInput
from clip_service.http.analyze import uploads
from clip_service.http.bodies import embed_body
from clip_service.http.current import admitted, current_service
from clip_service.http.errors import elapsed
from clip_service.http.logs import set_input_kind
from clip_service.http.options import check_text_budget, single_value
from clip_service.tasks.embed import ENCODINGS

embed_bp = Blueprint("embed", __name__)

JSON_KEYS = ("texts", "prompts", "encoding")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass(frozen=True)
class EmbedOptions:
    prompts: bool = False  # texts through the vocabulary's prompt ensemble, as /analyze scores labels
    encoding: str = "float"


def parse_embed_options(get: Callable[[str], list[str]], json_body: dict | None = None) -> EmbedOptions:
    """prompts and encoding from the query (`get(name)` -> every value) or the JSON body, not both."""
    values = {}
    for name in ("prompts", "encoding"):
        raw = single_value(get, name)
        if json_body is not None and name in json_body:
            if raw is not None:
                raise BadInput(f"Give {name} once: in the JSON body or the query string, not both")
            raw = json_body[name]
        values[name] = raw
    prompts, encoding = values["prompts"], values["encoding"]
    if isinstance(prompts, str):
        word = prompts.strip().lower()
        if word not in _TRUE + _FALSE:
            raise BadInput(f"prompts={prompts[:40]} is not a boolean; allowed: true or false")
        prompts = word in _TRUE
    elif prompts is not None and not isinstance(prompts, bool):
        raise BadInput("prompts must be true or false")
    if encoding is not None and encoding not in ENCODINGS:
        raise BadInput(f"encoding={str(encoding)[:40]} is not an encoding; allowed: {', '.join(ENCODINGS)}")
    return EmbedOptions(bool(prompts), encoding or "float")


def texts_from_json(body: object) -> list[str]:
    """The texts of a JSON body {"texts": [...], "prompts": ..., "encoding": ...}, checked."""
    if not isinstance(body, dict):
        raise BadInput('The JSON body must be an object such as {"texts": ["a dog", "a cat"]}')
    unknown = [key for key in body if key not in JSON_KEYS]
    if unknown:
        raise BadInput(f"Unknown key {str(unknown[0])[:40]!r} in the JSON body; allowed: "
                       f"{', '.join(JSON_KEYS)}")
    texts = body.get("texts")
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise BadInput('The JSON body needs "texts": a list of strings')
    for index, text in enumerate(texts):
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON lets "\ud800" through; no tokenizer or answer can use it
                raise BadInput(f"texts[{index}] is not valid Unicode (a lone surrogate)") from None
    return texts


def checked_texts(texts: list[str]) -> list[str]:
    """Texts with their whitespace normalised, none empty, within the per-request budget."""
    cleaned = [" ".join(text.split()) for text in texts]
    if not cleaned:
        raise BadInput("texts is empty; give at least one text")
    empty = [index for index, text in enumerate(cleaned) if not text]
    if empty:
        raise BadInput(f"texts[{empty[0]}] is empty")
    check_text_budget("texts", cleaned)
    return cleaned


def json_object() -> object:
    """The request's JSON body; None when it is not JSON (texts_from_json then says what is expected)."""
    try:
        return request.get_json(silent=True)
    except RecursionError:  # [[[[... nested deeper than the parser's recursion allows
        raise BadInput("The JSON body is nested too deeply; send {\"texts\": [...]}") from None


@embed_bp.route("/embed", methods=["GET", "POST"])
def embed():
    service = current_service()
    with admitted() as deadline:
        url = single_value(request.args.getlist, "url")
        path = single_value(request.args.getlist, "file")
        query_texts = request.args.getlist("text") or None
        json_body = json_texts = images = None
        if request.method == "POST" and request.mimetype == "application/json":
            json_body = json_object()
            json_texts = texts_from_json(json_body)
        elif request.method == "POST":
            images = uploads(service.settings.batch_files_max)
        given = [name for name, value in (("url", url), ("file", path), ("upload", images),
                                          ("text", query_texts), ("JSON texts", json_texts))
                 if value is not None]
        if len(given) != 1:
            raise BadInput("Give exactly one kind of input: ?url=..., ?file=..., a POST upload in the field "
                           'file (repeatable), ?text=... (repeatable) or a JSON POST {"texts": [...]}; got '
                           f"{' and '.join(given) if given else 'none'}")
        set_input_kind("text" if given[0] == "JSON texts" else given[0])
        options = parse_embed_options(request.args.getlist, json_body)
        texts = query_texts if query_texts is not None else json_texts
        if texts is not None:
            texts = checked_texts(texts)
        elif options.prompts:
            raise BadInput("prompts applies to texts only; leave it out for images")
        classifier = service.ready_classifier()
        if texts is not None:
            vectors = service.embed_texts(texts, options.prompts, deadline)
        else:
            if url is not None:
                images = [service.images.url_bytes(url, deadline)]
            elif path is not None:
                images = [service.images.file_bytes(path)]
            vectors = service.embed(images, deadline)
    return jsonify(embed_body(vectors, options.encoding, classifier, elapsed()))
