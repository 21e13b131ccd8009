"""decode_image, to_rgb, check_file_access and read_file: formats by content, modes, limits, paths."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import stat
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from clip_service.errors import BadInput, Forbidden, NotFound, TooLarge
from clip_service.inputs.images import ImageLimits, check_file_access, decode_image, read_file, to_rgb
from tests.support.file_races import flipping_to_a_symlink
from tests.support.images import BLUE, GREEN, RED, YELLOW, encode, image_bytes, png_declaring, quadrants
from tests.support.system import run_unprivileged, shared_folder

LIMITS = ImageLimits(max_bytes=20_000_000, max_pixels=50_000_000)
WHITE = (255, 255, 255)


def decode(data: bytes, max_bytes: int = LIMITS.max_bytes, max_pixels: int = LIMITS.max_pixels):
    return decode_image(data, ImageLimits(max_bytes, max_pixels))


def pixel(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in image.getpixel((x, y)))


def assert_close(actual, expected, tolerance: int) -> None:
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (actual, expected)


def assert_quadrants(image: Image.Image, tolerance: int) -> None:
    width, height = image.size
    for (x, y), colour in (((width // 4, height // 4), RED), ((3 * width // 4, height // 4), GREEN),
                           ((width // 4, 3 * height // 4), BLUE),
                           ((3 * width // 4, 3 * height // 4), YELLOW)):
        assert_close(pixel(image, x, y), colour, tolerance)


# ---------------------------------------------------------------------------------------------------
# Formats, recognised from the bytes


@pytest.mark.parametrize(("fmt", "options", "tolerance"), [
    ("PNG", {}, 0),
    ("JPEG", {"quality": 95}, 12),
    ("GIF", {}, 12),
    ("BMP", {}, 0),
    ("WEBP", {"lossless": True}, 0),
    ("WEBP", {"quality": 90}, 16),
], ids=["png", "jpeg", "gif", "bmp", "webp-lossless", "webp-lossy"])
def test_each_supported_format_decodes_to_rgb(fmt, options, tolerance):
    data = encode(quadrants(32, 24), fmt, **options)
    image = decode(data)
    assert image.mode == "RGB"
    assert image.size == (32, 24)
    assert_quadrants(image, tolerance)


def test_png_bytes_whatever_the_name_says(tmp_path):
    """Only the content counts: PNG bytes saved as photo.jpg decode as the PNG they are."""
    path = tmp_path.resolve() / "photo.jpg"
    path.write_bytes(encode(quadrants(), "PNG"))
    real = check_file_access(str(path), (tmp_path.resolve(),), private=False)
    image = decode(read_file(str(path), real, LIMITS.max_bytes))
    assert image.size == (32, 24)
    assert_quadrants(image, 0)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 12), colour) for colour in (RED, GREEN, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    image = decode(data)
    assert image.mode == "RGB"
    assert image.size == (16, 12)
    assert_close(pixel(image, 8, 6), RED, 12)


def test_animated_webp_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 12), colour) for colour in (GREEN, RED)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100,
                  lossless=True)
    image = decode(data)
    assert image.size == (16, 12)
    assert_close(pixel(image, 8, 6), GREEN, 4)


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat.png", encode(quadrants(), "PNG"))
    return buffer.getvalue()


UNSUPPORTED = {
    "tiff": encode(quadrants(), "TIFF"),
    "text": b"a cat sitting on a mat\n",
    "html": b"<!doctype html><html><body><img src='cat.png'></body></html>",
    "zip": _zip_bytes(),
    "ico": encode(quadrants(), "ICO"),
    "pdf-header": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
    "one-byte": b"\x89",
}


@pytest.mark.parametrize("data", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_content_is_bad_input(data):
    with pytest.raises(BadInput) as caught:
        decode(data)
    assert caught.value.status == 400
    assert "Not an image, or an unsupported format" in caught.value.message
    assert "PNG, JPEG, GIF, BMP, WebP" in caught.value.message


def test_empty_bytes_are_bad_input():
    with pytest.raises(BadInput, match=r"empty \(0 bytes\)") as caught:
        decode(b"")
    assert caught.value.status == 400


# ---------------------------------------------------------------------------------------------------
# Broken files


def _photo_jpeg() -> bytes:
    rng = np.random.default_rng(7)
    return encode(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), "JPEG", quality=90)


def _photo_png() -> bytes:
    rng = np.random.default_rng(7)
    return encode(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), "PNG")


def _bmp_with_header_size(size: int) -> bytes:
    data = bytearray(encode(quadrants(), "BMP"))
    data[14:18] = size.to_bytes(4, "little")
    return bytes(data)


def _bmp_with_bit_depth(depth: int) -> bytes:
    data = bytearray(encode(quadrants(), "BMP"))
    data[28:30] = depth.to_bytes(2, "little")
    return bytes(data)


def _webp_with_garbage_payload() -> bytes:
    data = bytearray(encode(quadrants(), "WEBP", lossless=True))
    data[20:] = b"\xff" * (len(data) - 20)
    return bytes(data)


BROKEN = {
    "jpeg-cut-in-half": _photo_jpeg()[: len(_photo_jpeg()) // 2],
    "jpeg-without-end": _photo_jpeg()[:-200],
    "jpeg-cut-in-header": _photo_jpeg()[:40],
    "png-cut-in-half": _photo_png()[: len(_photo_png()) // 2],
    "png-cut-in-ihdr": _photo_png()[:20],
    "png-bad-idat-crc": _photo_png()[:-30] + b"\x00" * 18 + _photo_png()[-12:],
    "png-signature-only": b"\x89PNG\r\n\x1a\n",
    "bmp-unknown-header-size": _bmp_with_header_size(99),
    "bmp-bit-depth-7": _bmp_with_bit_depth(7),
    "webp-garbage-payload": _webp_with_garbage_payload(),
}


@pytest.mark.parametrize("data", BROKEN.values(), ids=BROKEN.keys())
def test_truncated_or_corrupt_image_is_bad_input(data):
    with pytest.raises(BadInput) as caught:
        decode(data)
    assert caught.value.status == 400
    assert re.search(r"could not be decoded|Not an image", caught.value.message), caught.value.message


# ---------------------------------------------------------------------------------------------------
# Modes -> RGB


def test_palette_with_transparent_index_becomes_white():
    image = Image.new("P", (4, 1), 0)
    image.putpalette([0, 0, 0, *RED, *BLUE] + [0] * (256 - 3) * 3)
    image.putpixel((1, 0), 1)
    image.putpixel((2, 0), 2)
    decoded = decode(encode(image, "PNG", transparency=0))
    assert [pixel(decoded, x, 0) for x in range(3)] == [WHITE, RED, BLUE]


def test_palette_with_partial_alpha_is_blended_over_white():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([*RED, 0, 0, 0] + [0] * 254 * 3)
    image.info["transparency"] = bytes([128, 0])  # index 0 half transparent, index 1 transparent
    image.putpixel((1, 0), 1)
    rgb = to_rgb(image)
    assert_close(pixel(rgb, 0, 0), (237, 142, 142), 2)
    assert pixel(rgb, 1, 0) == WHITE


def test_palette_without_transparency_keeps_its_colours():
    image = quadrants().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert "transparency" not in image.info
    assert_quadrants(to_rgb(image), 0)


@pytest.mark.parametrize("through_png", [False, True], ids=["to_rgb", "png"])
def test_rgba_transparent_pixels_become_white(through_png):
    image = Image.new("RGBA", (3, 1))
    image.putdata([(0, 0, 0, 0), (*BLUE, 255), (255, 0, 0, 128)])
    rgb = decode(encode(image, "PNG")) if through_png else to_rgb(image)
    assert rgb.mode == "RGB"
    assert pixel(rgb, 0, 0) == WHITE
    assert pixel(rgb, 1, 0) == BLUE
    assert_close(pixel(rgb, 2, 0), (255, 127, 127), 2)


@pytest.mark.parametrize("through_png", [False, True], ids=["to_rgb", "png"])
def test_la_transparent_pixels_become_white(through_png):
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 0), (90, 255)])
    rgb = decode(encode(image, "PNG")) if through_png else to_rgb(image)
    assert [pixel(rgb, 0, 0), pixel(rgb, 1, 0)] == [WHITE, (90, 90, 90)]


def test_rgba_webp_transparency_becomes_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.paste((*RED, 255), (0, 0, 2, 4))
    rgb = decode(encode(image, "WEBP", lossless=True))
    assert pixel(rgb, 0, 0) == RED
    assert pixel(rgb, 3, 3) == WHITE


def test_greyscale_l():
    image = Image.new("L", (2, 2), 77)
    rgb = decode(encode(image, "PNG"))
    assert rgb.mode == "RGB"
    assert pixel(rgb, 1, 1) == (77, 77, 77)


def test_one_bit():
    image = Image.new("1", (8, 2), 0)
    image.putpixel((3, 1), 1)
    rgb = decode(encode(image, "PNG"))
    assert rgb.mode == "RGB"
    assert pixel(rgb, 0, 0) == (0, 0, 0)
    assert pixel(rgb, 3, 1) == WHITE


def test_cmyk_jpeg():
    image = Image.new("CMYK", (16, 8), (0, 0, 0, 0))  # white
    image.paste((255, 0, 0, 0), (0, 0, 8, 8))  # cyan on the left half
    data = encode(image, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    rgb = decode(data)
    assert rgb.mode == "RGB"
    assert_close(pixel(rgb, 2, 4), (0, 255, 255), 12)
    assert_close(pixel(rgb, 13, 4), WHITE, 12)


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (200, 1), (32768, 128), (65535, 255)])
def test_sixteen_bit_greyscale_png_is_scaled_not_clipped(value, expected):
    data = encode(np.full((4, 6), value, dtype=np.uint16), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = decode(data)
    assert rgb.mode == "RGB"
    assert rgb.size == (6, 4)
    assert_close(pixel(rgb, 0, 0), (expected,) * 3, 1)


def test_sixteen_bit_gradient_keeps_its_order():
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(1, 64).repeat(2, axis=0)
    grey = np.asarray(decode(encode(ramp, "PNG")))[0, :, 0].astype(int)
    assert grey[0] == 0
    assert grey[-1] == 255
    assert np.all(np.diff(grey) >= 0)
    assert 120 <= grey[32] <= 136


def test_thirty_two_bit_integer_and_float_modes():
    integer = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert integer.mode == "I"
    assert [pixel(to_rgb(integer), x, 0)[0] for x in range(3)] == [0, 127, 255]
    floats = Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert [pixel(to_rgb(floats), x, 0)[0] for x in range(3)] == [0, 127, 255]
    flat = Image.fromarray(np.full((1, 3), 4.5, dtype=np.float32))
    assert pixel(to_rgb(flat), 1, 0) == (0, 0, 0)


def test_rgb_is_returned_as_is():
    image = quadrants()
    assert to_rgb(image) is image


# ---------------------------------------------------------------------------------------------------
# EXIF orientation


def _oriented_jpeg(orientation: int) -> bytes:
    """40x20 stored pixels: left half red, right half blue, with an EXIF Orientation tag."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize(("orientation", "size", "red_at", "blue_at"), [
    (1, (40, 20), (5, 10), (35, 10)),
    (3, (40, 20), (35, 10), (5, 10)),    # rotated 180 degrees
    (6, (20, 40), (10, 5), (10, 35)),    # rotate 90 clockwise to display: left edge -> top
    (8, (20, 40), (10, 35), (10, 5)),    # rotate 90 counter-clockwise: left edge -> bottom
])
def test_exif_orientation_is_applied(orientation, size, red_at, blue_at):
    image = decode(_oriented_jpeg(orientation))
    assert image.size == size
    assert_close(pixel(image, *red_at), RED, 16)
    assert_close(pixel(image, *blue_at), BLUE, 16)


# ---------------------------------------------------------------------------------------------------
# Limits


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fail the test if any image data is decoded (header checks must come first)."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("pixel data was decoded before the size check")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def _bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(quadrants(4, 4), "BMP"))
    data[18:26] = width.to_bytes(4, "little") + height.to_bytes(4, "little")
    return bytes(data)


@pytest.mark.parametrize("data", [png_declaring(30_000, 30_000), _bmp_declaring(30_000, 30_000)],
                         ids=["png", "bmp"])
def test_decompression_bomb_is_refused_from_the_header(no_pixel_decoding, data):
    """A few hundred bytes claiming 900 megapixels: refused before a pixel is allocated."""
    assert len(data) < 200
    with pytest.raises(BadInput) as caught:
        decode(data, max_pixels=60_000_000)
    assert caught.value.status == 400
    assert re.search(r"too many pixels|30000x30000 pixels", caught.value.message), caught.value.message


def test_declared_size_over_max_pixels_is_refused_from_the_header(no_pixel_decoding):
    with pytest.raises(BadInput) as caught:
        decode(png_declaring(5000, 5000), max_pixels=1_000_000)
    assert "5000x5000" in caught.value.message
    assert "MAX_IMAGE_PIXELS" in caught.value.message


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_size_between_pillow_warning_and_error_is_refused_by_max_pixels(no_pixel_decoding):
    with pytest.raises(BadInput, match=r"12000x10000 pixels; the limit is 50000000"):
        decode(png_declaring(12_000, 10_000), max_pixels=50_000_000)


def test_max_pixels_is_inclusive():
    data = encode(quadrants(100, 50), "PNG")
    assert decode(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(BadInput, match=r"100x50 pixels; the limit is 4999 pixels \(MAX_IMAGE_PIXELS\)"):
        decode(data, max_pixels=4999)


def test_max_bytes_is_inclusive_and_over_is_too_large():
    data = encode(quadrants(), "PNG")
    assert decode(data, max_bytes=len(data)).size == (32, 24)
    with pytest.raises(TooLarge) as caught:
        decode(data, max_bytes=len(data) - 1)
    assert caught.value.status == 413
    assert f"{len(data)} bytes; the limit is {len(data) - 1}" in caught.value.message
    assert "MAX_IMAGE_BYTES" in caught.value.message


# ---------------------------------------------------------------------------------------------------
# Realistic photos


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def _grace_hopper_path() -> Path:
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("name", ["chelsea", "astronaut", "coffee"])
def test_skimage_photos(name, fmt):
    photo = _skimage(name)
    image = decode(encode(photo, fmt, **({"quality": 90} if fmt == "JPEG" else {})))
    assert image.mode == "RGB"
    assert image.size == (photo.shape[1], photo.shape[0])
    difference = np.abs(np.asarray(image, dtype=np.int16) - photo.astype(np.int16)).mean()
    assert difference < (4 if fmt == "JPEG" else 0.001)


def test_grace_hopper_jpeg_file_bytes():
    data = _grace_hopper_path().read_bytes()
    image = decode(data)
    assert image.mode == "RGB"
    assert image.size == (512, 600)
    assert np.asarray(image).std() > 20  # a photo, not a flat fill


def test_grace_hopper_as_png_and_webp():
    photo = np.asarray(Image.open(_grace_hopper_path()).convert("RGB"))
    for fmt, options in (("PNG", {}), ("WEBP", {"quality": 85})):
        image = decode(encode(photo, fmt, **options))
        assert image.size == (512, 600)
        assert np.abs(np.asarray(image, dtype=np.int16) - photo).mean() < 6


# ---------------------------------------------------------------------------------------------------
# File access


@pytest.fixture
def root(tmp_path) -> Path:
    folder = tmp_path.resolve() / "root"
    folder.mkdir()
    return folder


@pytest.fixture
def outside(tmp_path) -> Path:
    folder = tmp_path.resolve() / "outside"
    folder.mkdir()
    (folder / "secret.png").write_bytes(encode(quadrants(), "PNG"))
    return folder


def test_file_under_an_allowed_root_is_read(root):
    data = encode(quadrants(), "PNG")
    (root / "cats").mkdir()
    path = root / "cats" / "cat.png"
    path.write_bytes(data)
    real = check_file_access(str(path), (root,), private=False)
    assert real == path
    assert read_file(str(path), real, LIMITS.max_bytes) == data


def test_any_of_several_roots(root, outside):
    path = outside / "secret.png"
    assert check_file_access(str(path), (root, outside), private=False) == path


def test_path_outside_the_roots_is_forbidden(root, outside):
    raw = str(outside / "secret.png")
    with pytest.raises(Forbidden) as caught:
        check_file_access(raw, (root,), private=False)
    assert caught.value.status == 403
    assert raw in caught.value.message
    assert "outside the allowed folders (ALLOWED_FILE_ROOTS)" in caught.value.message


def test_private_flag_does_not_widen_configured_roots(root, outside):
    with pytest.raises(Forbidden, match="outside the allowed folders"):
        check_file_access(str(outside / "secret.png"), (root,), private=True)


def test_sibling_folder_sharing_the_prefix_is_forbidden(root, tmp_path):
    sibling = tmp_path.resolve() / "root-2"
    sibling.mkdir()
    (sibling / "x.png").write_bytes(b"x")
    with pytest.raises(Forbidden, match="outside the allowed folders"):
        check_file_access(str(sibling / "x.png"), (root,), private=False)


def test_dot_dot_traversal_out_of_the_root_is_forbidden(root, outside):
    raw = f"{root}/../outside/secret.png"
    with pytest.raises(Forbidden, match="outside the allowed folders"):
        check_file_access(raw, (root,), private=False)


def test_dot_dot_that_stays_inside_the_root_is_allowed(root):
    (root / "a").mkdir()
    (root / "b.png").write_bytes(b"b")
    assert check_file_access(f"{root}/a/../b.png", (root,), private=False) == root / "b.png"


def test_symlink_inside_the_root_pointing_outside_is_forbidden(root, outside):
    link = root / "innocent.png"
    link.symlink_to(outside / "secret.png")
    with pytest.raises(Forbidden, match="outside the allowed folders"):
        check_file_access(str(link), (root,), private=False)


def test_symlinked_folder_pointing_outside_is_forbidden(root, outside):
    (root / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(Forbidden, match="outside the allowed folders"):
        check_file_access(str(root / "linked" / "secret.png"), (root,), private=False)


def test_symlink_within_the_root_resolves_to_its_target(root):
    (root / "real.png").write_bytes(b"data")
    (root / "alias.png").symlink_to(root / "real.png")
    assert check_file_access(str(root / "alias.png"), (root,), private=False) == root / "real.png"


def test_no_roots_on_a_public_service_is_forbidden(root):
    (root / "cat.png").write_bytes(b"x")
    with pytest.raises(Forbidden) as caught:
        check_file_access(str(root / "cat.png"), (), private=False)
    assert caught.value.status == 403
    assert "ALLOWED_FILE_ROOTS" in caught.value.message
    assert "disabled" in caught.value.message


def test_no_roots_on_a_private_service_allows_any_path(root):
    data = encode(quadrants(), "PNG")
    (root / "cat.png").write_bytes(data)
    real = check_file_access(f"{root}/./cat.png", (), private=True)
    assert real == root / "cat.png"
    assert read_file(str(real), real, LIMITS.max_bytes) == data


@pytest.mark.parametrize(("raw", "problem"), [
    ("cat.png", "absolute path"),
    ("images/cat.png", "absolute path"),
    ("./cat.png", "absolute path"),
    ("../etc/passwd", "absolute path"),
    ("~/cat.png", "absolute path"),
    ("", "absolute path"),
    ("/tmp/cat\x00.png", "NUL byte"),
    ("\x00", "NUL byte"),
])
@pytest.mark.parametrize("private", [False, True])
def test_relative_paths_and_nul_bytes_are_bad_input(root, raw, problem, private):
    with pytest.raises(BadInput, match=problem) as caught:
        check_file_access(raw, (root,), private=private)
    assert caught.value.status == 400


def test_missing_file_under_the_root_is_not_found(root):
    raw = str(root / "missing.png")
    real = check_file_access(raw, (root,), private=False)
    with pytest.raises(NotFound) as caught:
        read_file(raw, real, LIMITS.max_bytes)
    assert caught.value.status == 404
    assert f"File not found: {raw}" in caught.value.message


def test_dangling_symlink_under_the_root_is_not_found(root):
    (root / "dangling.png").symlink_to(root / "gone.png")
    raw = str(root / "dangling.png")
    real = check_file_access(raw, (root,), private=False)
    with pytest.raises(NotFound, match="File not found"):
        read_file(raw, real, LIMITS.max_bytes)


def test_directory_is_bad_input(root):
    (root / "folder.png").mkdir()
    raw = str(root / "folder.png")
    real = check_file_access(raw, (root,), private=False)
    with pytest.raises(BadInput, match="Not a regular file") as caught:
        read_file(raw, real, LIMITS.max_bytes)
    assert raw in caught.value.message


def _read_in_thread(raw: str, real: Path, max_bytes: int, seconds: float = 5.0):
    outcome: dict[str, object] = {}

    def run():
        try:
            outcome["data"] = read_file(raw, real, max_bytes)
        except Exception as error:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return thread.is_alive(), outcome


def test_fifo_is_bad_input_without_hanging(root):
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    raw = str(fifo)
    real = check_file_access(raw, (root,), private=False)
    try:
        hung, outcome = _read_in_thread(raw, real, LIMITS.max_bytes)
    finally:
        with contextlib.suppress(OSError):  # release a reader that did block, so no thread is left
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not hung, "read_file blocked on a FIFO"
    assert isinstance(outcome.get("error"), BadInput), outcome
    assert "Not a regular file" in outcome["error"].message


def test_endless_character_device_is_bad_input(tmp_path):
    hung, outcome = _read_in_thread("/dev/zero", check_file_access("/dev/zero", (), private=True), 1000)
    assert not hung
    assert isinstance(outcome.get("error"), BadInput), outcome
    assert "Not a regular file: /dev/zero" in outcome["error"].message


def test_file_over_max_bytes_is_too_large(root):
    path = root / "big.png"
    path.write_bytes(b"\0" * 1001)
    real = check_file_access(str(path), (root,), private=False)
    with pytest.raises(TooLarge) as caught:
        read_file(str(path), real, 1000)
    assert caught.value.status == 413
    assert "1001 bytes; the limit is 1000 (MAX_IMAGE_BYTES)" in caught.value.message


def test_file_of_exactly_max_bytes_is_read(root):
    path = root / "exact.bin"
    path.write_bytes(b"\1" * 1000)
    assert read_file(str(path), path, 1000) == b"\1" * 1000


def test_unreadable_file_is_forbidden():
    with shared_folder() as folder:
        readable, locked = folder / "open.png", folder / "locked.png"
        readable.write_bytes(b"x")
        readable.chmod(0o644)
        locked.write_bytes(b"x")
        locked.chmod(0)

        def check():  # as an unprivileged user, even when the suite runs as root (CI)
            assert read_file(str(readable), readable, 1000) == b"x"
            with pytest.raises(Forbidden, match="not readable"):
                read_file(str(locked), locked, 1000)

        run_unprivileged(check)


def test_file_path_end_to_end(root):
    photo = _skimage("coffee")
    path = root / "coffee.webp"  # the name says WebP, the bytes are JPEG
    path.write_bytes(encode(photo, "JPEG", quality=90))
    real = check_file_access(str(path), (root,), private=False)
    image = decode(read_file(str(path), real, LIMITS.max_bytes))
    assert image.size == (600, 400)


def test_a_folder_swapped_after_the_check_is_not_followed_when_opened(root, outside):
    """The race below, made certain: the check passes, then a folder in the path becomes a symlink."""
    (root / "album").mkdir()
    (root / "album" / "secret.png").write_bytes(b"the picture that was checked")
    raw = str(root / "album" / "secret.png")
    real = check_file_access(raw, (root,), private=False)
    (root / "album").rename(root / "parked")
    (root / "album").symlink_to(outside, target_is_directory=True)
    with pytest.raises((Forbidden, NotFound)) as refused:  # 404 from the walk where openat2 is missing
        read_file(raw, real, LIMITS.max_bytes, (root,))
    assert raw in refused.value.message


def test_a_folder_swapped_for_a_symlink_never_leads_outside(tmp_path):
    """The check-then-open race: a folder in the root flips to a symlink to an outside folder."""
    from clip_service.errors import ServiceError

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "album").mkdir(parents=True)
    outside.mkdir()
    inside_data, outside_data = image_bytes("PNG", (4, 4), "red"), b"secret bytes"
    (root / "album" / "photo.png").write_bytes(inside_data)
    (outside / "photo.png").write_bytes(outside_data)
    (root / "real-album").mkdir()
    (root / "real-album" / "photo.png").write_bytes(inside_data)
    raw = str(root / "album" / "photo.png")
    outcomes = []
    with flipping_to_a_symlink(root / "album", outside):
        for _ in range(2000):
            try:
                real = check_file_access(raw, (root.resolve(),), private=False)
                outcomes.append(read_file(raw, real, LIMITS.max_bytes, (root.resolve(),)))
            except ServiceError as error:
                outcomes.append(error.status)
    assert outside_data not in outcomes
    # 400: a component was swapped while check_file_access resolved it (readlink's EINVAL).
    assert set(outcomes) <= {inside_data, 400, 403, 404}
    assert outcomes.count(inside_data) > 0 and len(set(outcomes)) > 1, "the race was not exercised"


def test_the_walk_without_openat2_follows_no_symlink(tmp_path):
    from clip_service.inputs.images import _walk_beneath

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "photo.png").write_bytes(b"x")
    os.symlink(tmp_path / "a" / "photo.png", tmp_path / "link.png")
    os.symlink(tmp_path / "a", tmp_path / "linked-dir")
    root_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = _walk_beneath(root_fd, "a/photo.png")
        assert stat.S_ISREG(os.fstat(fd).st_mode)
        os.close(fd)
        for relative, code in (("link.png", errno.ELOOP), ("linked-dir/photo.png", errno.ENOTDIR),
                               ("a/../a/photo.png", errno.EXDEV)):
            with pytest.raises(OSError) as raised:
                _walk_beneath(root_fd, relative)
            assert raised.value.errno == code, relative
    finally:
        os.close(root_fd)


def test_a_device_file_is_never_opened_for_reading(tmp_path):
    with pytest.raises(BadInput, match="Not a regular file"):
        read_file("/dev/zero", Path("/dev/zero"), LIMITS.max_bytes)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(BadInput, match="Not a regular file"):
        read_file(str(fifo), fifo, LIMITS.max_bytes, (tmp_path.resolve(),))


def test_a_huge_16_bit_image_converts_in_little_more_than_its_rgb_size(tmp_path):
    """7745 x 7745 16-bit greyscale PNG (about 130 KB): peak memory of its decoding in a fresh process."""
    import subprocess
    import sys

    values = np.zeros((7745, 7745), dtype=np.uint16)
    values[::7, ::5] = 60000
    Image.fromarray(values).save(tmp_path / "deep.png")
    del values
    script = (
        "import sys\n"
        "from clip_service.inputs.images import decode_image, ImageLimits\n"
        "def peak():  # VmHWM: this process's own peak (ru_maxrss would include the forking parent's)\n"
        "    return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = peak()\n"
        "image = decode_image(data, ImageLimits(8 << 20, 60_000_000))\n"
        "assert image.mode == 'RGB' and image.getpixel((0, 0)) == (233, 233, 233), image.getpixel((0, 0))\n"
        "print((peak() - before) / 1024)\n"
    )
    grown = float(subprocess.run([sys.executable, "-c", script, str(tmp_path / "deep.png")],
                                 capture_output=True, text=True, check=True,
                                 cwd=Path(__file__).resolve().parent.parent).stdout)
    rgb_megabytes = 7745 * 7745 * 4 / 2**20  # Pillow keeps RGB at 4 bytes a pixel
    source_megabytes = 7745 * 7745 * 2 / 2**20
    print(f"\n16-bit 7745x7745 PNG: peak memory grew {grown:.0f} MB; its 8-bit RGB image is "
          f"{rgb_megabytes:.0f} MB, the 16-bit image itself {source_megabytes:.0f} MB")
    assert grown > rgb_megabytes, "the measurement must see the decoded image at all"
    assert grown < 1.2 * (source_megabytes + rgb_megabytes), "source and RGB image, and little else"
