"""Fetching `url=` images without letting clients reach private networks (SSRF).

Every address a host resolves to is checked, and the connection goes to the address that was
checked (not to a second DNS answer), on every redirect hop. Bodies are streamed and cut at the
size limit; a wall-clock deadline covers slow-drip servers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterable
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import connection as urllib3_connection

from clip_service.errors import (
    BadInput,
    DeadlineExceeded,
    Forbidden,
    ServiceError,
    TooLarge,
    UpstreamFailed,
)

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_URL_LENGTH = 4096
CHUNK_BYTES = 64 * 1024
REDIRECT_STATUSES = {301, 302, 303, 307, 308}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return False
    return True


def refusal_reason(address: IPAddress) -> str | None:
    """Why a client may not make the service connect to this address, or None if it may."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            address = embedded
    for reason, test in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("site-local", isinstance(address, ipaddress.IPv6Address) and address.is_site_local),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if test:
            return reason
    return None if address.is_global else "non-public"


class AddressGuard:
    """Resolves host names and refuses addresses that are not public, unless allow-listed."""

    def __init__(self, allowlist: Iterable[str] = ()):
        self.allowed_hosts = set()
        self.allowed_networks = []
        for entry in allowlist:
            try:
                self.allowed_networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.allowed_hosts.add(entry.lower().rstrip("."))

    def _allowed(self, host: str, address: IPAddress) -> bool:
        if host.lower().rstrip(".") in self.allowed_hosts:
            return True
        candidates = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            candidates.append(address.ipv4_mapped)
        return any(candidate in network for candidate in candidates
                   for network in self.allowed_networks if candidate.version == network.version)

    def resolve(self, host: str, port: int) -> list[tuple[socket.AddressFamily, tuple]]:
        """All addresses of host, each checked; raises Forbidden if any one is refused."""
        try:
            answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as error:
            raise UpstreamFailed(f"Could not resolve host {host}: {error}") from None
        checked = []
        for family, _, _, _, sockaddr in answers:
            address = ipaddress.ip_address(sockaddr[0].split("%")[0])
            reason = refusal_reason(address)
            if reason and not self._allowed(host, address):
                # The client learns that the host is refused, not what an internal name resolves to.
                log.info("Refused URL host %s: it resolves to %s, a %s address", host, address, reason)
                what = f"a {reason} address" if _is_ip_literal(host) else "a name for a non-public address"
                raise Forbidden(f"URL host {host} is {what}, which is not allowed; add it to "
                                "URL_ALLOWLIST to allow it")
            checked.append((family, sockaddr))
        if not checked:
            raise UpstreamFailed(f"Could not resolve host {host}")
        return checked


def _guarded_new_conn(self) -> socket.socket:
    """urllib3's _new_conn, connecting only to addresses the guard has checked."""
    last_error: OSError | None = None
    for _family, sockaddr in self.guard.resolve(self._dns_host, self.port):
        try:
            sock = urllib3_connection.create_connection(
                (sockaddr[0], sockaddr[1]), self.timeout,
                source_address=self.source_address, socket_options=self.socket_options,
            )
        except OSError as error:
            last_error = error
            continue
        _watch_socket(sock)
        return sock
    raise UpstreamFailed(f"Could not connect to {self.host}: {last_error}")


_watch = threading.local()  # the current fetch's deadline and timers, per request thread


def _watch_socket(sock: socket.socket) -> None:
    """Shut the socket down at the fetch's deadline.

    Socket timeouts bound each read, not the whole answer: a server that drips one header byte a
    second would otherwise hold the request for ever.
    """
    deadline = getattr(_watch, "deadline", None)
    if deadline is None:
        return
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _shut_down, (sock,))
    timer.daemon = True
    timer.start()
    _watch.timers.append(timer)


def _shut_down(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def guarded_session(guard: AddressGuard) -> requests.Session:
    """A requests session whose every connection passes through the guard."""
    http_conn = type("GuardedHTTPConnection", (HTTPConnection,),
                     {"guard": guard, "_new_conn": _guarded_new_conn})
    https_conn = type("GuardedHTTPSConnection", (HTTPSConnection,),
                      {"guard": guard, "_new_conn": _guarded_new_conn})
    pools = {
        "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

    session = requests.Session()
    session.trust_env = False  # a proxy from the environment would bypass the address check
    session.mount("http://", GuardedAdapter(max_retries=0))
    session.mount("https://", GuardedAdapter(max_retries=0))
    return session


def check_url(url: str) -> None:
    if len(url) > MAX_URL_LENGTH:
        raise BadInput(f"URL is too long: {len(url)} characters; the limit is {MAX_URL_LENGTH}")
    if any(ord(character) < 0x20 or ord(character) == 0x7F for character in url):
        raise BadInput("Malformed URL: it contains a control character (NUL, CR, LF, ...); "
                       "percent-encode it")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as error:
        raise BadInput(f"Malformed URL: {error}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise BadInput(f"URL scheme must be http or https, not {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise BadInput("Malformed URL: it has no host name")


def _redact(url: str) -> str:
    """The URL without user:password, for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


class UrlFetcher:
    """Fetches image bytes over http(s) under the SSRF guard, size limit and deadline."""

    def __init__(self, max_bytes: int, timeout: float, allowlist: Iterable[str] = (),
                 accept: str = "image/*", max_redirects: int = MAX_REDIRECTS):
        self.max_redirects = max_redirects
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.accept = accept
        self.guard = AddressGuard(allowlist)

    def fetch(self, url: str, deadline: float | None = None) -> bytes:
        """The body of url; `deadline` (time.monotonic()) is the whole request's, if sooner.

        Past URL_TIMEOUT the answer is a 502 (the upstream is slow); past the request's own
        deadline it is a 504 (REQUEST_TIMEOUT).
        """
        own_deadline = time.monotonic() + self.timeout
        _watch.limit = ("URL_TIMEOUT", self.timeout, UpstreamFailed)
        if deadline is not None and deadline < own_deadline:
            _watch.limit = ("REQUEST_TIMEOUT", deadline - time.monotonic(), DeadlineExceeded)
        deadline = min(own_deadline, deadline or own_deadline)
        # A session per fetch: no pooled connection outlives its fetch's deadline watchdog.
        _watch.deadline, _watch.timers = deadline, []
        try:
            with guarded_session(self.guard) as session:
                return self._fetch(session, url, deadline)
        finally:
            for timer in _watch.timers:
                timer.cancel()
            _watch.deadline, _watch.timers = None, []

    def _fetch(self, session: requests.Session, url: str, deadline: float) -> bytes:
        for _hop in range(self.max_redirects + 1):
            check_url(url)
            try:
                response = session.get(
                    url, stream=True, allow_redirects=False, timeout=self._timeouts(url, deadline),
                    headers={"Accept": self.accept, "Accept-Encoding": "identity",
                             "User-Agent": "clip-service"},
                )
            except requests.exceptions.InvalidURL as error:
                raise BadInput(f"Malformed URL: {error}") from None
            except (requests.RequestException, UpstreamFailed) as error:
                # UpstreamFailed: no connection opened, and a connect cut by a deadline names it
                raise self._failure(url, error, deadline) from None
            with response:
                if response.status_code in REDIRECT_STATUSES and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise UpstreamFailed(
                        f"URL {_redact(url)} answered HTTP {response.status_code}, not an image")
                return self._read_body(response, url, deadline)
        raise UpstreamFailed(f"URL {_redact(url)} redirected more than {self.max_redirects} times")

    def _failure(self, url: str, error: Exception, deadline: float) -> ServiceError:
        if time.monotonic() >= deadline:
            name, seconds, kind = _watch.limit
            return kind(f"URL {_redact(url)} took longer than the {seconds:.3g} s allowed ({name})")
        if isinstance(error, UpstreamFailed):
            return error
        return UpstreamFailed(f"Could not fetch URL {_redact(url)}: {type(error).__name__}")

    def _timeouts(self, url: str, deadline: float) -> tuple[float, float]:
        """(connect, read) socket timeouts: what is left of the deadline (a redirect hop used some)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._failure(url, TimeoutError(), deadline)
        return (remaining, remaining)

    def _read_body(self, response: requests.Response, url: str, deadline: float) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise TooLarge(f"URL body is {int(declared)} bytes; the limit is {self.max_bytes} "
                           "(MAX_IMAGE_BYTES)")
        body = bytearray()
        try:
            while True:
                # read1 returns whatever has arrived, so a slow drip still meets the deadline;
                # raw bytes (no decoding) so a compressed bomb cannot expand past the limit.
                chunk = response.raw.read1(CHUNK_BYTES, decode_content=False)
                if not chunk:
                    break
                body += chunk
                if len(body) > self.max_bytes:
                    raise TooLarge(f"URL body is over the limit of {self.max_bytes} bytes "
                                   "(MAX_IMAGE_BYTES)")
                if time.monotonic() > deadline:
                    raise self._failure(url, TimeoutError(), deadline)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._failure(url, error, deadline) from None
        if time.monotonic() >= deadline:  # the watchdog shut the socket: what came is not whole
            raise self._failure(url, TimeoutError(), deadline)
        if declared.isdigit() and len(body) < int(declared):
            raise UpstreamFailed(f"URL {_redact(url)} ended after {len(body)} of {declared} bytes")
        return bytes(body)
