"""UrlFetcher against a real loopback HTTP server, and the SSRF guard (refusal_reason, AddressGuard).

Every test runs inside conftest's autouse `network_fence`: a connection beyond loopback fails the test,
and host names resolve only through `fake_dns`.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from clip_service.errors import BadInput, DeadlineExceeded, Forbidden, TooLarge, UpstreamFailed
from clip_service.inputs import url_fetch
from clip_service.inputs.url_fetch import MAX_REDIRECTS, AddressGuard, UrlFetcher, refusal_reason
from tests.support.images import cat_png

CAT_PNG = cat_png()
LIMIT = 400_000
BIG = 3 * LIMIT
TIMEOUT = 1.0
HTML = b"<!doctype html><html><body>not an image</body></html>"


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.stopping = threading.Event()

    def handle_error(self, request, client_address):
        pass  # clients that hang up early (size limit, deadline) are expected here

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection; bodies without a length end at close
    server: Server

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.server.requests.append((self.path, dict(self.headers)))
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        if path == "/cat.png":
            self.reply(200, CAT_PNG, "image/png")
        elif path == "/notimage":
            self.reply(200, HTML, "text/html")
        elif path == "/big":
            self.reply(200, b"\0" * BIG, "image/png")
        elif path == "/big-unsized":
            self.stream_without_length(b"\0" * BIG)
        elif path == "/exact":
            self.reply(200, b"\1" * LIMIT, "image/png")
        elif path.startswith("/redirect-to/"):
            self.redirect("/" + path.removeprefix("/redirect-to/"))
        elif path == "/redirect":
            self.redirect(query["to"][0], int(query.get("status", ["302"])[0]))
        elif path.startswith("/hops/"):
            left = int(path.removeprefix("/hops/"))
            self.redirect(f"/hops/{left - 1}" if left else "/cat.png")
        elif path == "/loop":
            self.redirect("/loop")
        elif path == "/to-private":
            self.redirect("http://10.0.0.1/x")
        elif path == "/drip":
            self.drip_body()
        elif path == "/drip-headers":
            self.drip_headers()
        else:
            self.reply(404, b"not found", "text/plain")

    def reply(self, status: int, body: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str, status: int = 302):
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def stream_without_length(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        for start in range(0, len(body), 16 * 1024):
            self.wfile.write(body[start:start + 16 * 1024])

    def drip_body(self):
        """Headers at once, then one byte every 0.2 s until the client hangs up."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.flush()
        while not self.server.stopping.wait(0.2):
            self.wfile.write(b"\0")
            self.wfile.flush()

    def drip_headers(self):
        """The status line, then a header value one byte every 0.2 s for 3 s, then an empty body."""
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nX-Drip: ")
        self.wfile.flush()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not self.server.stopping.wait(0.2):
            self.wfile.write(b"x")
            self.wfile.flush()
        self.wfile.write(b"\r\n\r\n")


@pytest.fixture(scope="module")
def server():
    httpd = Server()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.stopping.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def fresh_log(server):
    server.requests.clear()


def fetcher(*allowlist: str, max_bytes: int = LIMIT, timeout: float = TIMEOUT) -> UrlFetcher:
    return UrlFetcher(max_bytes, timeout, allowlist)


@pytest.fixture
def local():
    """A fetcher that may reach the test server on 127.0.0.1."""
    return fetcher("127.0.0.1")


# ---------------------------------------------------------------------------------------------------
# Fetching from an allow-listed server


def test_fetch_returns_the_body(server, local, network_fence):
    assert local.fetch(f"{server.base}/cat.png") == CAT_PNG
    assert server.paths() == ["/cat.png"]
    _, headers = server.requests[0]
    assert headers["Accept-Encoding"] == "identity"
    assert network_fence == []


def test_content_type_is_not_trusted_either_way(server, local):
    assert local.fetch(f"{server.base}/notimage") == HTML


def test_body_of_exactly_the_limit_is_accepted(server, local):
    assert local.fetch(f"{server.base}/exact") == b"\1" * LIMIT


def test_allowlist_by_network(server):
    assert fetcher("127.0.0.0/8").fetch(f"{server.base}/cat.png") == CAT_PNG


def test_allowlist_by_host_name(server, fake_dns):
    fake_dns["images.test"] = fake_dns["images.test."] = ["127.0.0.1"]
    port = server.server_address[1]
    assert fetcher("images.test").fetch(f"http://images.test:{port}/cat.png") == CAT_PNG
    assert fetcher("IMAGES.test.").fetch(f"http://Images.Test.:{port}/cat.png") == CAT_PNG


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_followed(server, local, status):
    url = f"{server.base}/redirect?to=/redirect-to/cat.png&status={status}"
    assert local.fetch(url) == CAT_PNG
    assert server.paths()[1:] == ["/redirect-to/cat.png", "/cat.png"]


def test_absolute_redirect_is_followed(server, local):
    assert local.fetch(f"{server.base}/redirect?to={server.base}/cat.png") == CAT_PNG


def test_as_many_redirects_as_allowed(server, local):
    assert local.fetch(f"{server.base}/hops/{MAX_REDIRECTS - 1}") == CAT_PNG
    assert len(server.requests) == MAX_REDIRECTS + 1


def test_one_redirect_too_many(server, local):
    with pytest.raises(UpstreamFailed, match=f"redirected more than {MAX_REDIRECTS} times"):
        local.fetch(f"{server.base}/hops/{MAX_REDIRECTS}")
    assert len(server.requests) == MAX_REDIRECTS + 1


def test_redirect_loop(server, local):
    with pytest.raises(UpstreamFailed) as caught:
        local.fetch(f"{server.base}/loop")
    assert caught.value.status == 502
    assert "redirect" in caught.value.message
    assert set(server.paths()) == {"/loop"}
    assert len(server.requests) == MAX_REDIRECTS + 1


@pytest.mark.parametrize("path, reason", [
    ("/big", f"bytes; the limit is {LIMIT}"),  # refused from Content-Length, before the body
    ("/big-unsized", f"over the limit of {LIMIT} bytes"),  # cut while streaming
])
def test_oversized_body_is_too_large(server, local, path, reason):
    with pytest.raises(TooLarge) as caught:
        local.fetch(server.base + path)
    assert caught.value.status == 413
    assert reason in caught.value.message
    assert "MAX_IMAGE_BYTES" in caught.value.message


def test_declared_length_over_the_limit_names_it(server, local):
    with pytest.raises(TooLarge, match=f"{BIG} bytes; the limit is {LIMIT}"):
        local.fetch(f"{server.base}/big")


def test_http_error_status(server, local):
    with pytest.raises(UpstreamFailed) as caught:
        local.fetch(f"{server.base}/404")
    assert caught.value.status == 502
    assert "HTTP 404" in caught.value.message


def test_slow_drip_body_meets_the_deadline(server, local):
    started = time.monotonic()
    with pytest.raises(UpstreamFailed) as caught:
        local.fetch(f"{server.base}/drip")
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, elapsed
    assert "took longer than the 1 s allowed (URL_TIMEOUT)" in caught.value.message


def test_slow_drip_headers_meet_the_deadline(server, local):
    """The module promises a wall-clock deadline against slow-drip servers; headers count too.

    The server drips one header byte every 0.2 s for 3 s (each socket read well inside the 1 s
    timeout), then ends the headers and sends an empty body.
    """
    started = time.monotonic()
    try:
        outcome = local.fetch(f"{server.base}/drip-headers")
    except UpstreamFailed as error:
        outcome = error
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"a header drip held the fetch for {elapsed:.1f} s with URL_TIMEOUT=1 ({outcome!r})"
    assert isinstance(outcome, UpstreamFailed)


@pytest.mark.parametrize("request_deadline, error, limit", [
    (0.3, DeadlineExceeded, "took longer than the 0.3 s allowed (REQUEST_TIMEOUT)"),
    (None, UpstreamFailed, "took longer than the 1 s allowed (URL_TIMEOUT)"),
])
def test_a_connection_that_never_opens_meets_the_deadline(local, request_deadline, error, limit):
    """A host that never finishes the TCP handshake (a full accept queue): whichever deadline is sooner
    ends the fetch and names itself, 504 for the request's own."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=1):  # fills the queue of 1
            started = time.monotonic()
            deadline = None if request_deadline is None else started + request_deadline
            with pytest.raises(error) as caught:
                local.fetch(f"http://127.0.0.1:{port}/cat.png", deadline)
            elapsed = time.monotonic() - started
    assert limit in caught.value.message
    assert elapsed < (request_deadline or TIMEOUT) + 0.5, elapsed


def test_closed_port_is_upstream_failure(local):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UpstreamFailed) as caught:
        local.fetch(f"http://127.0.0.1:{port}/cat.png")
    assert caught.value.status == 502
    assert "127.0.0.1" in caught.value.message


def test_unknown_host_is_upstream_failure(network_fence):
    with pytest.raises(UpstreamFailed, match="Could not resolve host nowhere.test"):
        fetcher().fetch("http://nowhere.test/cat.png")
    assert network_fence == []


def test_credentials_are_not_repeated_in_messages(server, local):
    port = server.server_address[1]
    with pytest.raises(UpstreamFailed) as caught:
        local.fetch(f"http://user:s3cret@127.0.0.1:{port}/404")
    assert "s3cret" not in caught.value.message
    assert f"http://127.0.0.1:{port}/404" in caught.value.message


# ---------------------------------------------------------------------------------------------------
# URLs refused before anything is resolved


@pytest.mark.parametrize(("url", "scheme"), [
    ("ftp://example.com/cat.png", "ftp"),
    ("file:///etc/passwd", "file"),
    ("javascript:alert(1)", "javascript"),
    ("data:image/png;base64,iVBORw0KGgo=", "data"),
    ("gopher://127.0.0.1:70/_GET", "gopher"),
    ("cat.png", "none"),
    ("//example.com/cat.png", "none"),
    ("", "none"),
])
def test_non_http_schemes_are_bad_input(url, scheme, network_fence):
    with pytest.raises(BadInput) as caught:
        fetcher("127.0.0.1").fetch(url)
    assert caught.value.status == 400
    assert f"URL scheme must be http or https, not {scheme!r}" in caught.value.message
    assert network_fence == []


@pytest.mark.parametrize(("url", "problem"), [
    ("http://", "no host name"),
    ("http:///cat.png", "no host name"),
    ("http://user@:80/", "no host name"),
    ("http://[::1/cat.png", "Malformed URL"),
    ("http://example.com:99999/", "Malformed URL"),
    ("http://example.com:port/", "Malformed URL"),
    ("http://exa mple.com/", "Malformed URL"),
    ("http://%00/", "Malformed URL"),
    ("http://example.com/" + "a" * 5000, "too long"),
])
def test_malformed_urls_are_bad_input(url, problem, network_fence):
    with pytest.raises(BadInput, match=problem) as caught:
        fetcher().fetch(url)
    assert caught.value.status == 400
    assert network_fence == []


def test_redirect_to_another_scheme_is_bad_input(server, local):
    with pytest.raises(BadInput, match="not 'file'"):
        local.fetch(f"{server.base}/redirect?to=file:///etc/passwd")


# ---------------------------------------------------------------------------------------------------
# SSRF: refused before connecting, on every hop

SSRF_URLS = [
    ("http://127.0.0.1:{port}/cat.png", "loopback"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://[::1]:{port}/", "loopback"),
    ("http://[::ffff:127.0.0.1]:{port}/", "loopback"),
    ("http://[::ffff:a9fe:a9fe]/latest/meta-data", "link-local"),
    ("http://2130706433:{port}/", "loopback"),
    ("http://0177.0.0.1:{port}/", "loopback"),
    ("http://0x7f.1:{port}/", "loopback"),
    ("http://localhost:{port}/", "loopback"),
    ("http://localhost.:{port}/", "loopback"),
    ("http://LocalHost:{port}/", "loopback"),
    ("http://example.com@127.0.0.1:{port}/", "loopback"),
    ("http://10.1.2.3/", "private"),
    ("https://10.1.2.3/", "private"),
    ("http://192.168.0.1:8080/admin", "private"),
    ("http://[fd00::1]/", "private"),
    ("http://[fe80::1]/", "link-local"),
    ("http://0.0.0.0:{port}/", "unspecified"),
    ("http://[::]:{port}/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://100.64.0.1/", "non-public"),
    ("http://[2002:a00:1::]/", "private"),
]


@pytest.mark.parametrize(("template", "reason"), SSRF_URLS, ids=[url for url, _ in SSRF_URLS])
def test_ssrf_targets_are_forbidden(server, network_fence, template, reason):
    url = template.format(port=server.server_address[1])
    with pytest.raises(Forbidden) as caught:
        fetcher().fetch(url)
    assert caught.value.status == 403
    try:  # an address written as such is named with its kind; a name's addresses stay unsaid
        ipaddress.ip_address(urlsplit(url).hostname)
        assert f"a {reason} address" in caught.value.message
    except ValueError:
        assert "a name for a non-public address" in caught.value.message
    assert "URL_ALLOWLIST" in caught.value.message
    assert network_fence == []
    assert server.requests == []


def test_name_resolving_to_a_private_address(network_fence, fake_dns):
    fake_dns["intranet.test"] = ["192.168.1.5"]
    with pytest.raises(Forbidden, match=r"intranet\.test is a name for a non-public address") as refused:
        fetcher().fetch("http://intranet.test/cat.png")
    assert "192.168" not in str(refused.value) and "private" not in str(refused.value)
    assert network_fence == []


@pytest.mark.parametrize("answers", [["93.184.216.34", "10.0.0.7"], ["10.0.0.7", "93.184.216.34"]],
                         ids=["private-second", "private-first"])
def test_name_with_one_private_address_among_public_ones(network_fence, fake_dns, answers):
    fake_dns["mixed.test"] = answers
    with pytest.raises(Forbidden, match=r"is a name for a non-public address"):
        fetcher().fetch("http://mixed.test/cat.png")
    assert network_fence == []


def test_redirect_from_an_allowed_server_to_a_private_address(server, network_fence, fake_dns):
    fake_dns["images.test"] = ["127.0.0.1"]
    port = server.server_address[1]
    with pytest.raises(Forbidden) as caught:
        fetcher("images.test").fetch(f"http://images.test:{port}/to-private")
    assert "10.0.0.1" in caught.value.message
    assert server.paths() == ["/to-private"]
    assert network_fence == []


def test_allowed_name_does_not_allow_its_address(server, network_fence, fake_dns):
    """Allow-listing images.test does not open 127.0.0.1 to a redirect that names it directly."""
    fake_dns["images.test"] = ["127.0.0.1"]
    port = server.server_address[1]
    with pytest.raises(Forbidden, match="loopback"):
        fetcher("images.test").fetch(f"http://images.test:{port}/redirect?to={server.base}/cat.png")
    assert server.paths() == [f"/redirect?to={server.base}/cat.png"]


def test_allowlist_of_another_network_does_not_allow_loopback(server, network_fence):
    with pytest.raises(Forbidden, match="loopback"):
        fetcher("10.0.0.0/8", "images.test").fetch(f"{server.base}/cat.png")
    assert server.requests == []


def test_proxy_from_the_environment_is_not_used(server, network_fence, monkeypatch):
    """A proxy would resolve and connect to the target itself, out of the guard's sight."""
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, server.base)  # the test server answers proxied requests too
    with pytest.raises(Forbidden, match=r"10\.0\.0\.1 is a private address"):
        fetcher("127.0.0.1").fetch("http://10.0.0.1/cat.png")
    assert server.requests == []
    assert network_fence == []


# ---------------------------------------------------------------------------------------------------
# DNS rebinding: the connection goes to the address that was checked


@pytest.fixture
def connections(monkeypatch):
    """The (host, port) each guarded connection is opened to."""
    seen = []
    real = url_fetch.urllib3_connection.create_connection

    def record(address, *args, **kwargs):
        seen.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(url_fetch.urllib3_connection, "create_connection", record)
    return seen


def test_connection_goes_to_the_checked_address_not_the_name(server, fake_dns, connections):
    fake_dns["images.test"] = ["127.0.0.1"]
    port = server.server_address[1]
    assert fetcher("images.test").fetch(f"http://images.test:{port}/redirect-to/cat.png") == CAT_PNG
    assert connections == [("127.0.0.1", port), ("127.0.0.1", port)]
    for host, _ in connections:
        ipaddress.ip_address(host)  # numeric, so nothing is resolved a second time


class Rebinding:
    """A DNS answer that changes after it was first given: public-looking first, private after."""

    def __init__(self, first: list[str], later: list[str]):
        self.answers = [first]
        self.later = later

    def __iter__(self):
        return iter(self.answers.pop(0) if self.answers else self.later)


def test_dns_rebinding_after_the_check_is_not_followed(server, fake_dns, connections, network_fence):
    fake_dns["rebind.test"] = Rebinding(["127.0.0.1"], ["10.0.0.1"])
    port = server.server_address[1]
    assert fetcher("127.0.0.0/8").fetch(f"http://rebind.test:{port}/cat.png") == CAT_PNG
    assert connections == [("127.0.0.1", port)]
    assert network_fence == []


def test_rebound_name_is_checked_again_on_the_next_hop(server, fake_dns, network_fence):
    fake_dns["rebind.test"] = Rebinding(["127.0.0.1"], ["10.0.0.1"])
    port = server.server_address[1]
    with pytest.raises(Forbidden, match=r"rebind\.test is a name for a non-public address") as refused:
        fetcher("127.0.0.0/8").fetch(f"http://rebind.test:{port}/redirect-to/cat.png")
    assert "10.0.0.1" not in str(refused.value), "the answer must not say what an internal name is"
    assert server.paths() == ["/redirect-to/cat.png"]
    assert network_fence == []


# ---------------------------------------------------------------------------------------------------
# refusal_reason and AddressGuard: pure checks, no network

REASONS = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.5", "private"),
    ("fd12:3456::1", "private"),
    ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"),
    ("fec0::1", "site-local"),               # deprecated site-local, still routed inside sites
    ("224.0.0.251", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("4000::1", "reserved"),
    ("::2", "reserved"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "link-local"),
    ("2002:a00:1::", "private"),            # 6to4 embedding 10.0.0.1
    ("2002:7f00:1::", "loopback"),          # 6to4 embedding 127.0.0.1
    ("2002:c0a8:105::1", "private"),        # 6to4 embedding 192.168.1.5
    ("100.64.0.1", "non-public"),           # carrier-grade NAT: not private, not global either
    ("8.8.8.8", None),
    ("93.184.216.34", None),
    ("2001:4860:4860::8888", None),
    ("::ffff:8.8.8.8", None),
    ("2002:808:808::", None),               # 6to4 embedding 8.8.8.8
]


@pytest.mark.parametrize(("address", "reason"), REASONS, ids=[address for address, _ in REASONS])
def test_refusal_reason(address, reason):
    assert refusal_reason(ipaddress.ip_address(address)) == reason


def test_guard_returns_the_checked_addresses(fake_dns):
    fake_dns["cdn.test"] = ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]
    answers = AddressGuard().resolve("cdn.test", 443)
    assert {sockaddr[0] for _, sockaddr in answers} == set(fake_dns["cdn.test"])
    assert {family for family, _ in answers} == {socket.AF_INET, socket.AF_INET6}
    assert all(sockaddr[1] == 443 for _, sockaddr in answers)


def test_guard_allowlist_entries():
    guard = AddressGuard(["Images.Test.", "10.0.0.0/8", "fd00::/8", "192.168.1.5"])
    assert guard.resolve("10.9.8.7", 80)[0][1][0] == "10.9.8.7"
    assert guard.resolve("::ffff:10.9.8.7", 80)  # an IPv4-mapped address matches the IPv4 network
    assert guard.resolve("fd00::5", 80)
    assert guard.resolve("192.168.1.5", 80)
    with pytest.raises(Forbidden, match="192.168.1.6"):
        guard.resolve("192.168.1.6", 80)
    with pytest.raises(Forbidden, match="loopback"):
        guard.resolve("127.0.0.1", 80)


def test_guard_allowlisted_name_is_matched_case_and_dot_insensitively(fake_dns):
    fake_dns["images.test"] = ["127.0.0.1"]
    fake_dns["images.test."] = ["127.0.0.1"]
    guard = AddressGuard(["Images.Test."])
    assert guard.resolve("images.test", 80) == [(socket.AF_INET, ("127.0.0.1", 80))]
    assert guard.resolve("IMAGES.TEST.", 80) == [(socket.AF_INET, ("127.0.0.1", 80))]
    with pytest.raises(Forbidden):
        AddressGuard().resolve("images.test", 80)
