"""Hostile parameters to /analyze: each one gets a precise 4xx in the error JSON shape, never a 500.

Over-long and NUL-bearing values, bytes that are not UTF-8, special files (FIFO, devices, a folder,
/proc), repeated parameters, malformed POST bodies, wrong methods, and URL spellings of internal
addresses: every one is refused with a message that names the problem, and no URL form makes the
service open a connection (the conftest network fence records any attempt).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import io
import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.images import image_bytes
from tests.support.live_client import LiveClient
from tests.support.responses import assert_error, assert_success
from tests.support.waiting import no_hang

PNG = image_bytes("PNG", (40, 30))


@pytest.fixture(params=["app", pytest.param("CLIP.sh", marks=pytest.mark.system)])
def client(request):
    """Each case twice: through the app in-process, and through CLIP.sh (the front door and gunicorn)."""
    if request.param == "app":
        return request.getfixturevalue("app").test_client()
    if "fake_dns" in inspect.signature(request.function).parameters:
        pytest.skip("CLIP.sh resolves through the fail-closed fence, not this test's fake_dns")
    return request.getfixturevalue("clip_sh_client")


@pytest.fixture
def private_client(make_app, settings):
    """PRIVATE=True and no ALLOWED_FILE_ROOTS: the service may read any file it can."""
    return make_app(dataclasses.replace(settings, allowed_file_roots=(), private=True)).test_client()


# ----------------------------------------------------------------------------------------------
# Over-long values, NUL bytes, bytes that are not UTF-8.


def assert_too_long(client, response, *fragments) -> None:
    """400 naming the value from the app; from CLIP.sh the front door refuses the request line first."""
    if isinstance(client, LiveClient):
        assert_error(response, 414, "request line", "POST form")
    else:
        assert_error(response, 400, *fragments)


def test_over_long_url_is_400(client, network_fence):
    url = "http://example.com/" + "a" * (10_000 - len("http://example.com/"))
    assert len(url) == 10_000
    assert_too_long(client, client.get("/analyze", query_string={"url": url}), "too long", "10000")
    assert network_fence == []


@pytest.mark.parametrize("shape", ["one long name", "many folders"])
def test_over_long_path_is_400(shape, client, tmp_path):
    if shape == "one long name":
        path = f"{tmp_path}/{'a' * 10_000}.png"  # one name over NAME_MAX (255)
    else:
        path = f"{tmp_path}/" + "d/" * 5_000 + "x.png"  # a path over PATH_MAX (4096)
    assert_too_long(client, client.get("/analyze", query_string={"file": path}), "too long")


@pytest.mark.parametrize("url", [
    "http://public.test/a\x00b.jpg",
    "http://public.test/a.jpg\x00",
    "http://public.test/a.jpg?q=\x00",
    "http://public.test/a.jpg\r\nX-Injected: 1",
    "http://public\x00.test/a.jpg",
    "http://public.test\x00.evil.test/a.jpg",
])
def test_nul_or_control_character_in_url_is_400_without_connecting(url, client, fake_dns, network_fence):
    """A URL with a NUL (or CR LF) is malformed: refused, not silently re-encoded and fetched."""
    fake_dns["public.test"] = ["93.184.216.34"]  # a public address: only a refusal stops the fetch
    response = client.get("/analyze", query_string={"url": url})
    assert network_fence == [], f"the service connected for {url!r} instead of refusing it"
    assert_error(response, 400, "URL")


@pytest.mark.parametrize("path", ["/tmp/a\x00b.png", "\x00", "/\x00/etc/passwd"])
def test_nul_in_file_is_400(path, private_client):
    assert_error(private_client.get("/analyze", query_string={"file": path}), 400, "NUL")


@pytest.mark.parametrize("query, status, fragment", [
    ("file=%ff%fe", 400, "absolute path"),
    ("file=/%ff%fe.png", 403, "ALLOWED_FILE_ROOTS"),
    ("url=%ff%fe", 400, "scheme"),
    ("url=http%ff://a.example/x.jpg", 400, "scheme"),
    ("url=http://a.example/%ff%fe.jpg&url=%ff", 400, "Give url only once"),
    ("file=/a%00%ff.png", 400, "NUL"),
])
def test_non_utf8_query_string_percent_encoded(query, status, fragment, client, network_fence):
    """Werkzeug keeps bytes that are not UTF-8 percent-encoded (%FF%FE): a plain, refusable string."""
    assert_error(client.get(f"/analyze?{query}"), status, fragment)
    assert network_fence == []


def test_non_utf8_bytes_in_url_host_are_a_dns_failure(client, network_fence):
    """%FF%FE.example is a syntactically valid (percent-encoded) host name that resolves nowhere: 502."""
    assert_error(client.get("/analyze?url=http://%ff%fe.example/x.jpg"), 502, "Could not resolve host")
    assert network_fence == []


@pytest.mark.parametrize("raw", [
    b"file=\xff\xfe",
    b"file=/\xff\xfe.png",
    b"url=\xff\xfe",
    b"url=http://\xc3\x28.example/x.jpg",
    b"file=\xff&file=\xfe",
    b"threshold=\xff",
])
def test_non_utf8_query_string_raw_bytes_is_400(raw, client, network_fence):
    """Raw bytes that are not UTF-8 (WSGI passes the query string as bytes decoded as latin-1)."""
    response = client.get("/analyze", environ_overrides={"QUERY_STRING": raw.decode("latin-1")})
    assert_error(response, 400, "UTF-8")
    assert network_fence == []


def test_raw_non_ascii_utf8_file_path_is_404(private_client, tmp_path):
    """The control for the case above: raw bytes that are UTF-8 (here ÿþ) are a plain path."""
    missing = f"{tmp_path}/\xff\xfe.png".encode().decode("latin-1")  # UTF-8 bytes; no such file
    response = private_client.get("/analyze", environ_overrides={"QUERY_STRING": "file=" + missing})
    assert_error(response, 404, "not found")


# ----------------------------------------------------------------------------------------------
# Files that are not regular files, or that the service must not show.


def test_fifo_under_allowed_root_is_400_without_hanging(client, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with no_hang():
        assert_error(client.get("/analyze", query_string={"file": str(fifo)}), 400, "Not a regular file")


def test_fifo_with_a_writer_is_still_refused(client, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a writer holding it open, data waiting
    try:
        os.write(writer, PNG)
        with no_hang():
            assert_error(client.get("/analyze", query_string={"file": str(fifo)}), 400,
                         "Not a regular file")
    finally:
        os.close(writer)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom", "/dev/random", "/dev/tty"])
def test_devices_are_400_without_hanging(device, make_app, settings):
    if not os.path.exists(device):
        pytest.skip(f"{device} is absent")
    private = make_app(dataclasses.replace(settings, allowed_file_roots=(), private=True)).test_client()
    dev_root = make_app(dataclasses.replace(settings, allowed_file_roots=(Path("/dev"),))).test_client()
    for client in (private, dev_root):
        with no_hang():
            response = client.get("/analyze", query_string={"file": device})
        message = assert_error(response, 400)
        # /dev/tty without a controlling terminal cannot even be opened (ENXIO): also a clean 400
        assert "Not a regular file" in message or (
            device == "/dev/tty" and "cannot be opened" in message), message


def test_device_symlink_under_allowed_root_is_400(client, tmp_path):
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    # the real path (/dev/zero) is outside the root: refused before it is opened
    assert_error(client.get("/analyze", query_string={"file": str(tmp_path / "zero.png")}), 403, "outside")


@pytest.mark.parametrize("which", ["root itself", "sub-folder", "trailing slash"])
def test_directory_is_400(which, client, tmp_path):
    (tmp_path / "photos").mkdir()
    path = {"root itself": str(tmp_path), "sub-folder": str(tmp_path / "photos"),
            "trailing slash": f"{tmp_path}/photos/"}[which]
    assert_error(client.get("/analyze", query_string={"file": path}), 400, "Not a regular file")


def environment_secrets() -> list[str]:
    """Values from this process's /proc/self/environ long enough to recognise in an answer."""
    with open("/proc/self/environ", "rb") as environ:
        entries = environ.read().split(b"\0")
    values = [entry.partition(b"=")[2].decode(errors="replace") for entry in entries]
    return [value for value in values if len(value) >= 8 and "/proc/" not in value]


@pytest.mark.parametrize("path, status, fragment", [
    ("/proc/self/environ", 400, "Not an image"),  # size 0, yet read up to the limit: not an image
    ("/proc/self/cmdline", 400, "Not an image"),
    ("/proc/self/maps", 400, "Not an image"),
    ("/proc/self/status", 400, "Not an image"),
    ("/proc/self/mem", 400, "cannot be read"),  # reading offset 0 fails with EIO
    ("/proc/self/fd/0", 400, ""),  # stdin: a pipe or /dev/null under pytest, a file if redirected
])
def test_proc_files_fail_cleanly_without_leaking(path, status, fragment, private_client):
    """/proc files claim size 0; whatever is read, it is not an image and nothing of it is shown."""
    with no_hang():
        response = private_client.get("/analyze", query_string={"file": path})
    assert_error(response, status, fragment)
    text = response.get_data(as_text=True)
    leaked = [value[:20] for value in environment_secrets() if value in text]
    assert not leaked, f"environment values in the answer: {leaked}"
    assert "PATH=" not in text


def test_proc_environ_under_a_root_is_refused(make_app, settings):
    client = make_app(dataclasses.replace(settings, allowed_file_roots=(Path("/proc"),))).test_client()
    response = client.get("/analyze", query_string={"file": "/proc/self/environ"})
    message = assert_error(response, 400)
    assert "PATH=" not in message


def test_proc_under_public_service_is_403(client):
    assert_error(client.get("/analyze", query_string={"file": "/proc/self/environ"}), 403, "outside")


# ----------------------------------------------------------------------------------------------
# Repeated parameters, bad POST bodies, wrong methods.


@pytest.mark.parametrize("query, fragment", [
    ("url=http://a.example/1.jpg&url=http://a.example/2.jpg", "Give url only once"),
    ("file=/a.jpg&file=/b.jpg", "Give file only once"),
    ("file=/a.jpg&file=/a.jpg", "Give file only once"),
    ("url=&url=", "Give url only once"),
    ("file=/a.jpg&url=http://a.example/x.jpg", "got url and file"),
    ("url=", "scheme"),
    ("file=", "absolute path"),
])
def test_repeated_and_conflicting_parameters_are_400(query, fragment, client, network_fence):
    assert_error(client.get(f"/analyze?{query}"), 400, fragment)
    assert network_fence == []


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ-boundary") -> bytes:
    """A multipart/form-data body by hand: (field name, filename or None, content)."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n").encode() + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("kwargs, fragment", [
    ({"data": {"image": (io.BytesIO(PNG), "x.png")}, "content_type": "multipart/form-data"},
     "no field named file"),
    ({"data": {"other": "value"}, "content_type": "multipart/form-data"}, "no field named file"),
    ({"data": {"file": "just text, not a file"}, "content_type": "multipart/form-data"},
     "no field named file"),
    ({"data": {"file": [(io.BytesIO(PNG), "a.png"), (io.BytesIO(PNG), "b.png")]},
      "content_type": "multipart/form-data"}, "2 were sent"),
    ({"data": b"not an image", "content_type": "image/jpeg"}, "Not an image"),  # a raw image body
    ({"data": b"", "content_type": "application/octet-stream"}, "empty"),
    ({"data": PNG}, "multipart/form-data"),
    ({"json": {"url": "http://a.example/x.jpg"}}, "multipart/form-data"),
    ({"data": {"url": "http://a.example/x.jpg"}}, "multipart/form-data"),  # form-urlencoded
    ({"data": "file=%89PNG", "content_type": "application/x-www-form-urlencoded"}, "multipart/form-data"),
    ({"data": b"", "content_type": "multipart/form-data; boundary=XyZ"}, "no field named file"),
])
def test_bad_post_bodies_are_400(kwargs, fragment, client):
    # a copy each time: the parameters' file objects are read (and closed) by the client, and every
    # case runs twice, in-process and through CLIP.sh
    assert_error(client.post("/analyze", **copy.deepcopy(kwargs)), 400, fragment)


@pytest.mark.parametrize("content_type, body", [
    ("multipart/form-data", multipart([("file", "x.png", PNG)])),  # no boundary parameter
    ("multipart/form-data; boundary=", multipart([("file", "x.png", PNG)])),
    ("multipart/form-data; boundary=other", multipart([("file", "x.png", PNG)])),
    ("multipart/form-data; boundary=XyZ-boundary", multipart([("file", "x.png", PNG)])[:-30]),
    ("multipart/form-data; boundary=XyZ-boundary", b"--XyZ-boundary\r\ngarbage without headers"),
    ('multipart/form-data; boundary="unterminated', multipart([("file", "x.png", PNG)])),
])
def test_malformed_multipart_is_400(content_type, body, client):
    with no_hang():
        response = client.post("/analyze", data=body, content_type=content_type)
    assert_error(response, 400, "no field named file")  # Werkzeug drops what it cannot parse


def test_over_long_boundary_that_matches_its_body_is_parsed(client):
    """RFC 2046 allows 70 characters; Werkzeug parses a 5000-character boundary that matches its body,
    quickly, and the image inside is classified."""
    body = multipart([("file", "x.png", PNG)], "b" * 5000)
    with no_hang():
        response = client.post("/analyze", data=body, content_type="multipart/form-data; boundary="
                               + "b" * 5000)
    assert_success(response)


def test_well_formed_hand_built_multipart_is_200(client):
    """The control for the malformed cases: the same builder with the right boundary works."""
    body = multipart([("file", "x.png", PNG)])
    assert_success(client.post("/analyze", data=body,
                               content_type="multipart/form-data; boundary=XyZ-boundary"))


def test_two_file_fields_by_hand_are_400(client):
    body = multipart([("file", "a.png", PNG), ("file", "b.png", PNG)])
    response = client.post("/analyze", data=body, content_type="multipart/form-data; boundary=XyZ-boundary")
    assert_error(response, 400, "2 were sent")


def test_empty_filename_is_judged_by_content(client):
    """A browser with no file chosen sends filename="" and no bytes; a name never decides anything."""
    assert_success(client.post("/analyze", data={"file": (io.BytesIO(PNG), "")},
                               content_type="multipart/form-data"))
    assert_error(client.post("/analyze", data={"file": (io.BytesIO(b""), "")},
                             content_type="multipart/form-data"), 400, "empty")


@pytest.mark.parametrize("name_length, status, fragment", [
    (10_000, 400, "no field named file"),
    (1_000_000, 413, "exceeds the capacity limit"),  # over Flask's MAX_FORM_MEMORY_SIZE (500 kB)
])
def test_huge_multipart_field_name_is_4xx(name_length, status, fragment, client):
    body = multipart([("n" * name_length, "x.png", PNG)])
    with no_hang():
        response = client.post("/analyze", data=body,
                               content_type="multipart/form-data; boundary=XyZ-boundary")
    assert_error(response, status, fragment)


def test_huge_file_field_filename_is_judged_by_content(client):
    body = multipart([("file", "f" * 100_000 + ".png", PNG)])
    response = client.post("/analyze", data=body, content_type="multipart/form-data; boundary=XyZ-boundary")
    assert_success(response)  # a 100 kB file name is only a name: the PNG inside is classified


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/analyze", "/health", "/labels"])
def test_other_methods_are_405(method, path, client):
    response = client.open(path, method=method, data=PNG)
    assert_error(response, 405, "method is not allowed")


@pytest.mark.parametrize("path, allowed", [("/analyze", {"GET", "POST"}), ("/health", {"GET"})])
def test_405_names_the_allowed_methods(path, allowed, client):
    """RFC 9110 15.5.6: a 405 response MUST carry Allow, the methods the resource takes."""
    response = client.open(path, method="PUT")
    assert_error(response, 405)
    methods = {method.strip() for method in response.headers.get("Allow", "").split(",") if method.strip()}
    assert allowed <= methods, f"Allow header: {response.headers.get('Allow')!r}"


# ----------------------------------------------------------------------------------------------
# URL spellings of internal addresses: 403 with no connection attempt.


@pytest.mark.parametrize("url, reason", [
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:7f00:1]/x.jpg", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://0177.0.0.1/", "loopback"),
    ("http://0x7f000001/", "loopback"),
    ("http://0x7f.0.0.1/", "loopback"),
    ("http://localhost./", "loopback"),
    ("http://LOCALHOST/", "loopback"),
    ("http://example.com@127.0.0.1/", "loopback"),
    ("http://user:pass@127.0.0.1:8080/x.jpg", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://127.0.0.1:80/", "loopback"),
    ("https://127.0.0.1/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[::]/", "unspecified"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://10.0.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[fd00::1]/", "private"),
    ("http://evil.test/x.jpg", "private"),
    ("http://EVIL.TEST./x.jpg", "private"),
    ("http://rebind.test/x.jpg", "private"),  # one public and one private answer: refused
])
def test_internal_address_forms_are_403_without_connecting(url, reason, client, fake_dns, network_fence):
    fake_dns["evil.test"] = ["10.0.0.8"]
    fake_dns["evil.test."] = ["10.0.0.8"]
    fake_dns["rebind.test"] = ["93.184.216.34", "10.0.0.8"]
    host = urlsplit(url).hostname
    try:  # an address written as such is named with its kind; what a name resolves to stays unsaid
        ipaddress.ip_address(host)
    except ValueError:
        reason = "a name for a non-public address"
    message = assert_error(client.get("/analyze", query_string={"url": url}), 403, reason, "URL_ALLOWLIST")
    assert "10.0.0.8" not in message
    assert network_fence == []
    assert "pass" not in message  # credentials in the URL are never echoed
