"""Every route declared once: how the front door serves it, who may call it, how large its body may be.

The door (light lane or MAX_QUEUE), access control (open or behind API_KEY), the body limits (one image
or many), the OpenAPI description (which routes need no key) and the routes themselves read this
table, so a route's facts cannot drift apart. Flask-free: the gunicorn worker reads it before any
request.
"""

from __future__ import annotations

from dataclasses import dataclass

# The WSGI environ key under which the front door says when a request's first byte arrived.
ARRIVED_KEY = "clip_service.arrived"


@dataclass(frozen=True)
class Route:
    """`light`: cheap, answered on the door's own threads under any load (never with a body);
    otherwise it takes one of MAX_QUEUE places. `probe`: light, with a thread of its own, so that no
    number of other light requests delays it. `open`: needs no API key and takes any origin.
    `many_files`: a multipart body may carry BATCH_FILES_MAX images."""

    path: str
    methods: tuple[str, ...]
    light: bool = False
    probe: bool = False
    open: bool = False
    many_files: bool = False


ROUTES = (
    Route("/", ("GET",), light=True, open=True),
    Route("/static/page.css", ("GET",), light=True, open=True),
    Route("/static/page.js", ("GET",), light=True, open=True),
    Route("/health", ("GET",), light=True, probe=True, open=True),
    Route("/openapi.json", ("GET",), light=True, open=True),
    Route("/metrics", ("GET",), light=True),
    Route("/labels", ("GET",), light=True),
    Route("/search/index", ("GET",), light=True),
    Route("/analyze", ("GET", "POST")),
    Route("/v3/analyze", ("GET", "POST")),
    Route("/v2/analyze", ("GET",)),
    Route("/v2/analyze_file", ("GET",)),
    Route("/analyze/batch", ("POST",), many_files=True),
    Route("/embed", ("GET", "POST"), many_files=True),
    Route("/search", ("GET", "POST")),
    Route("/search/thumbnail", ("GET",)),
)
BY_PATH = {route.path: route for route in ROUTES}
OPEN_PATHS = frozenset(route.path for route in ROUTES if route.open)
MANY_FILES_PATHS = frozenset(route.path for route in ROUTES if route.many_files)


def is_light(method: str, path: str) -> bool:
    """Answered on the light lane: a light route, a CORS preflight, or a path no route serves (a 404
    or 405 costs nothing). The door sends any request with a body to the MAX_QUEUE lane instead."""
    route = BY_PATH.get(path)
    return method == "OPTIONS" or route is None or route.light


def is_probe(method: str, path: str) -> bool:
    """The readiness probe: the orchestrator stops a worker whose /health misses its 2 s timeout."""
    route = BY_PATH.get(path)
    return method != "OPTIONS" and route is not None and route.probe


def is_open(method: str, path: str) -> bool:
    """Needs no API key and is refused to no origin: a preflight, or an open route."""
    return method == "OPTIONS" or path in OPEN_PATHS
