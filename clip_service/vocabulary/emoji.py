"""An emoji for each label: the emoji API's mappings first, the shipped dictionary as fallback.

The API is fetched in a background thread. Start-up waits for it at most API_TIMEOUT; requests never
wait for it at all. While it is down the thread retries, so mappings appear once it is up.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import requests

from clip_service import metrics
from clip_service.errors import ServiceError
from clip_service.inputs.url_fetch import UrlFetcher
from clip_service.settings import Settings

log = logging.getLogger(__name__)

MAX_MAPPING_BYTES = 5 * 1024 * 1024


def concept_key(label: str) -> str:
    """The API's key for a label: lower case, `_` for spaces."""
    return "_".join(label.lower().split())


def parse_mappings(payload: object) -> dict[str, str]:
    """A JSON object of concept -> emoji strings, else ValueError (treated as the API being down)."""
    if not isinstance(payload, dict):
        raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
    mappings = {}
    for key, value in payload.items():
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"the value for {key!r} is not an emoji string")
        mappings[concept_key(key)] = value.strip()
    return mappings


def load_dictionary(path: Path) -> dict[str, str]:
    """The shipped fallback dictionary; a missing file only means no fallback."""
    try:
        return parse_mappings(json.loads(Path(path).read_text(encoding="utf-8")))
    except FileNotFoundError:
        log.warning("Emoji dictionary %s not found; labels get emoji only from the API", path)
        return {}


class EmojiMapper:
    """Label -> emoji: the API's mappings when it has answered, else the local dictionary's."""

    def __init__(self, local: dict[str, str], api_url: str | None, timeout: float,
                 retry_seconds: float = 30.0):
        self.local = local
        self.api_url = api_url
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.api: dict[str, str] = {}
        self.api_reachable = False
        self._first_attempt = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The API is an operator's own service, usually on this host: any address is fine, but
        # the fetch gets the same whole-answer deadline and size limit as a client's URL. Being
        # allowed every address, it follows no redirect: the API itself is all it may reach.
        self._fetcher = UrlFetcher(MAX_MAPPING_BYTES, timeout, allowlist=("0.0.0.0/0", "::/0"),
                                   accept="application/json", max_redirects=0)

    def emoji_for(self, label: str) -> str | None:
        key = concept_key(label)
        return self.api.get(key) or self.local.get(key)

    def start(self) -> None:
        """Fetch the API in the background; wait for the first answer at most API_TIMEOUT."""
        if self.api_url is None:
            return
        self._thread = threading.Thread(target=self._run, name="emoji-api", daemon=True)
        self._thread.start()
        if not self._first_attempt.wait(self.timeout) or not self.api_reachable:
            log.warning("Emoji API %s is not answering; using the local dictionary and retrying "
                        "every %g s", self.api_url, self.retry_seconds)

    def stop(self) -> None:
        self._stop.set()

    def fetch_once(self) -> bool:
        """Ask the API once, in this thread, with no retries (the tagger's way); True if it answered."""
        try:
            self.api = self.fetch()
        except (requests.RequestException, ValueError) as error:
            log.warning("Emoji API %s did not answer (%s); using the local dictionary only",
                        self.api_url, error)
            return False
        self.api_reachable = True
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.api = self.fetch()
                self.api_reachable = True
                metrics.EMOJI_API_UP.set(1)
                log.info("Loaded %d emoji mappings from %s", len(self.api), self.api_url)
                return
            except Exception as error:  # any failure means "down": log it and retry, never die
                self.api_reachable = False
                metrics.EMOJI_API_UP.set(0)
                log.debug("Emoji API %s failed: %s: %s", self.api_url, type(error).__name__, error)
            finally:
                self._first_attempt.set()
            self._stop.wait(self.retry_seconds)

    def fetch(self) -> dict[str, str]:
        """The API's mappings, within API_TIMEOUT for the whole answer and a size limit."""
        try:
            body = self._fetcher.fetch(self.api_url)
        except ServiceError as error:
            raise ValueError(error.message) from None
        try:
            return parse_mappings(json.loads(body))
        except RecursionError:
            raise ValueError("the answer is nested too deeply to be emoji mappings") from None


def emoji_mapper(settings: Settings) -> EmojiMapper:
    """The mapper the settings describe: EMOJI_DICTIONARY locally, the API at API_HOST:API_PORT."""
    api_url = f"http://{settings.api_host}:{settings.api_port}/emoji_mappings.json"
    return EmojiMapper(load_dictionary(settings.emoji_dictionary), api_url, settings.api_timeout,
                       settings.emoji_retry_seconds)
