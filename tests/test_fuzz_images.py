"""Hostile image bytes through the same code as /analyze: crafted files, then property-based mutations.

Every upload, however broken, must end in 200 success or a 4xx in the error JSON shape: never a 500,
never an exception out of the app, never a hang, and the process memory must not run away. The
crafted files are checked one by one with the status each must get; the fuzz tests mutate them
(truncation, bit flips, byte overwrites and insertions, chunk duplication, header field tampering).
`pytest -s` prints how many cases ran and the count of each status; CLIP_FUZZ_SCALE=10 runs ten times
as many cases (the default keeps the file near 30 s). The runs are derandomised, so CI is repeatable.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import gc
import io
import os
import resource
import struct
import time
import zipfile
import zlib
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image

from tests.support.images import PNG_SIGNATURE, encode, png_chunk, png_declaring, quadrants
from tests.support.responses import assert_error, assert_success, upload
from tests.support.waiting import no_hang

DEADLINE_MS = 5000  # per fuzz case
HANG_SECONDS = 30  # a case still running after this is a hang: the watchdog fails it
CRAFTED_SECONDS = 2.0  # asserted per crafted file (measured: under 0.4 s each; the README states both)
# Asserted: the peak for a 1 x 100,000 image (measured: under 1 MB; resizing it untrimmed would
# allocate 100,000 x 64 x 3 bytes, 19 MB, at the tiny model's size).
RSS_GROWTH_LIMIT_MB = 16
# Asserted: anonymous resident memory over a second pass of a strategy's cases, the allocator's free
# pages given back before each reading (measured: 0 MB; the first pass, with its one-time allocations,
# grew it by up to 22 MB, and untrimmed readings moved by up to 16 MB with the suite's order).
FUZZ_LEAK_LIMIT_MB = 16
LOWERED_PIXELS = 16_000_000  # MAX_IMAGE_PIXELS for the bomb cases: 10000x10000 over, 4000x4000 at it
FUZZ_SCALE = int(os.environ.get("CLIP_FUZZ_SCALE", "1"))
FUZZ_EXAMPLES = {strategy: count * FUZZ_SCALE for strategy, count in {
    "truncation": 60, "bit_flips": 80, "overwrite_insert": 60, "chunk_duplication": 40,
    "header_tampering": 80}.items()}


# ----------------------------------------------------------------------------------------------
# The corpus: valid seeds of every supported format, and crafted hostile files.


def _png_raw(width: int, height: int, colour_type: int, bit_depth: int, rows: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows, 9))
            + png_chunk(b"IEND", b""))


def black_png(width: int, height: int) -> bytes:
    """An all-black greyscale PNG, compressed as far as zlib goes (about 1000:1): a real bomb."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + one byte per pixel
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def elongated_png(width: int, height: int) -> bytes:
    """A grey RGB PNG of width x height, e.g. 1 x 100000 (a few hundred bytes)."""
    row = b"\x00" + b"\x80" * (3 * width)
    return _png_raw(width, height, 2, 8, row * height)


def animated_gif(frames: int = 3000, side: int = 4) -> bytes:
    palette = [0, 0, 0, 255, 255, 255] + [0] * 762
    images = []
    for index in range(frames):
        frame = Image.new("P", (side, side), index % 2)
        frame.putpalette(palette)
        images.append(frame)
    buffer = io.BytesIO()
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=10, loop=0,
                   optimize=False)
    return buffer.getvalue()


def jpeg_with_huge_exif() -> bytes:
    """A JPEG whose APP1 EXIF block is about 60 KB (the segment limit is 64 KB), orientation 6."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90
    exif[0x010E] = "x" * 60_000  # ImageDescription
    return encode(quadrants(), "JPEG", exif=exif.tobytes())


def gif_with_huge_comment() -> bytes:
    return encode(quadrants().convert("P"), "GIF", comment=b"c" * 1_000_000)


def sixteen_bit_png() -> bytes:
    ramp = (np.arange(32 * 24, dtype=np.uint16).reshape(24, 32) * 85).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


def rgba_png() -> bytes:
    image = quadrants().convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    return encode(image, "PNG")


def palette_transparent_png() -> bytes:
    image = quadrants().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    return encode(image, "PNG", transparency=0)


def cmyk_jpeg() -> bytes:
    return encode(quadrants().convert("CMYK"), "JPEG")


def photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


def minimal_pdf() -> bytes:
    return encode(quadrants(), "PDF")


def zip_of_png() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("photo.png", encode(quadrants(), "PNG"))
    return buffer.getvalue()


SVG = (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" '
       b'height="64"><rect width="64" height="64" fill="red"/></svg>\n')
HTML = b"<!DOCTYPE html><html><head><title>x</title></head><body><img src=x.png></body></html>"

# name -> builder of the bytes
SEEDS = {
    "png_rgb": lambda: encode(quadrants(), "PNG"),
    "png_grey": lambda: encode(quadrants().convert("L"), "PNG"),
    "png_palette": lambda: encode(quadrants().convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
    "png_palette_transparent": palette_transparent_png,
    "png_rgba": rgba_png,
    "png_16bit": sixteen_bit_png,
    "png_interlaced": lambda: encode(quadrants(), "PNG", interlace=1),
    "jpeg": lambda: encode(quadrants(), "JPEG"),
    "jpeg_progressive": lambda: encode(quadrants(), "JPEG", progressive=True),
    "jpeg_cmyk": cmyk_jpeg,
    "jpeg_huge_exif": jpeg_with_huge_exif,
    "gif": lambda: encode(quadrants().convert("P"), "GIF"),
    "gif_huge_comment": gif_with_huge_comment,
    "gif_animated_3000": animated_gif,
    "bmp": lambda: encode(quadrants(), "BMP"),
    "bmp_palette": lambda: encode(quadrants().convert("P"), "BMP"),
    "webp_lossy": lambda: encode(quadrants(), "WEBP", quality=80),
    "webp_lossless_alpha": lambda: encode(quadrants().convert("RGBA"), "WEBP", lossless=True),
    "photo_chelsea_jpeg": lambda: encode(photo("chelsea"), "JPEG", quality=85),
    "photo_astronaut_png": lambda: encode(photo("astronaut").resize((128, 128)), "PNG"),
    "photo_camera_grey_png": lambda: encode(photo("camera").resize((128, 128)), "PNG"),
    "photo_coffee_webp": lambda: encode(photo("coffee"), "WEBP"),
    "photo_rocket_bmp": lambda: encode(photo("rocket").resize((160, 107)), "BMP"),
    "png_1x1": lambda: encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"),
    "png_1x100000": lambda: elongated_png(1, 100_000),
    "png_100000x1": lambda: elongated_png(100_000, 1),
    "png_ihdr_30000x30000": lambda: png_declaring(30_000, 30_000),
    "png_bomb_10000x10000": lambda: black_png(10_000, 10_000),
    "png_bomb_4000x4000": lambda: black_png(4_000, 4_000),
    "tiff": lambda: encode(quadrants(), "TIFF"),
    "svg": lambda: SVG,
    "html": lambda: HTML,
    "pdf": minimal_pdf,
    "zip": zip_of_png,
    "empty": lambda: b"",
}


@functools.cache
def seed(name: str) -> bytes:
    return SEEDS[name]()


# name -> (status, fragment of the message, lowered MAX_IMAGE_PIXELS?)
EXPECTED = {name: (200, None, False) for name in SEEDS}
EXPECTED.update({
    "png_ihdr_30000x30000": (400, "30000x30000", False),
    "png_bomb_10000x10000": (400, "10000x10000", True),
    "png_bomb_4000x4000": (200, None, True),  # exactly at the lowered limit: allowed
    "tiff": (400, "Not an image, or an unsupported format", False),
    "svg": (400, "Not an image", False),
    "html": (400, "Not an image", False),
    "pdf": (400, "Not an image", False),
    "zip": (400, "Not an image", False),
    "empty": (400, "empty", False),
})


# ----------------------------------------------------------------------------------------------
# Helpers: the upload, the outcome check, memory and a hang watchdog.


def check_outcome(response) -> int:
    """200 in the success shape or 4xx in the error shape; anything else fails the test."""
    status = response.status_code
    if status == 200:
        assert_success(response)
    else:
        assert 400 <= status < 500, f"HTTP {status}: {response.get_data()[:300]!r}"
        assert_error(response, status)
    return status


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def rss_mb() -> float:
    gc.collect()
    return _proc_status_kb("VmRSS") / 1024


def anonymous_rss_mb() -> float:
    """Resident heap and other anonymous memory, where a leak shows; not the shared libraries' pages,
    which the kernel may drop and read back in at any time. Memory already freed but kept by glibc's
    allocator (its arenas' free pages) is given back first: it is no leak, and how much of it stays
    depends on the order of earlier allocations (15 MB in one suite run, none in another)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _proc_status_kb("RssAnon") / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux: clear_refs 5); False where not allowed (then the lifetime peak is used).

    Garbage is collected first, so memory freed afterwards cannot pass for growth.
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        return _proc_status_kb("VmHWM") / 1024
    except (OSError, LookupError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_growths(action, limit_mb: float) -> list[float]:
    """Peak memory growth of `action()`, measured again once if over `limit_mb`.

    The peak is the whole process's: another thread's allocation can land in one measurement, while
    the bugs these checks guard against cost hundreds of megabytes every time. Compare the smallest.
    """
    growths = []
    for _ in range(2):
        reset_peak_rss()
        before = rss_mb()
        action()
        growths.append(peak_rss_mb() - before)
        if growths[-1] < limit_mb:
            break
    return growths


TOTALS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _print_totals():
    yield
    if TOTALS:
        cases = TOTALS.pop("cases")
        outcomes = ", ".join(f"{status}: {count}" for status, count in sorted(TOTALS.items()))
        print(f"\n[fuzz] total: {cases} fuzz cases; outcomes by HTTP status: {outcomes}")


# ----------------------------------------------------------------------------------------------
# Each crafted file once, with the status it must get.


@pytest.mark.parametrize("name", list(SEEDS))
def test_crafted_file(name, make_app, settings):
    status, fragment, lowered = EXPECTED[name]
    if lowered:
        settings = dataclasses.replace(settings, max_image_pixels=LOWERED_PIXELS)
    client = make_app(settings).test_client()
    data = seed(name)
    started = time.perf_counter()
    with no_hang(HANG_SECONDS):
        response = upload(client, data, "upload.bin")
    elapsed = time.perf_counter() - started
    assert check_outcome(response) == status, response.get_json()
    if fragment:
        assert fragment in response.get_json()["error"]["message"]
    assert elapsed < CRAFTED_SECONDS, f"{name} took {elapsed:.2f} s"


def test_crafted_files_are_what_they_claim():
    """The corpus itself: the bombs are small, the animation long, the EXIF and comment huge."""
    assert 60_000 < len(seed("png_bomb_10000x10000")) < 150_000  # 100 MB of pixels in ~100 KB
    assert Image.open(io.BytesIO(seed("png_bomb_10000x10000"))).size == (10_000, 10_000)
    assert Image.open(io.BytesIO(seed("gif_animated_3000"))).n_frames == 3000
    exif = Image.open(io.BytesIO(seed("jpeg_huge_exif"))).info["exif"]
    assert 60_000 < len(exif) < 65_534
    assert len(Image.open(io.BytesIO(seed("gif_huge_comment"))).info["comment"]) == 1_000_000
    assert Image.open(io.BytesIO(seed("png_16bit"))).mode.startswith("I")
    assert Image.open(io.BytesIO(seed("jpeg_cmyk"))).mode == "CMYK"
    assert len(seed("png_1x100000")) < 2_000 and len(seed("png_100000x1")) < 2_000


@pytest.mark.parametrize("max_pixels", [LOWERED_PIXELS, 60_000_000])
def test_real_bomb_is_refused_before_decoding(max_pixels, make_app, settings):
    """100 MB of pixels in ~100 KB: refused from the header, so memory barely moves."""
    client = make_app(dataclasses.replace(settings, max_image_pixels=max_pixels)).test_client()
    upload(client, seed("png_1x1"), "upload.bin")  # warm up
    responses = []
    bomb = seed("png_bomb_10000x10000")
    growths = peak_growths(lambda: responses.append(upload(client, bomb, "upload.bin")), 50)
    print(f"\n[fuzz] PNG bomb 10000x10000, MAX_IMAGE_PIXELS={max_pixels}: HTTP {responses[-1].status_code}, "
          f"peak RSS +{min(growths):.0f} MB")
    for response in responses:
        assert check_outcome(response) == 400
        message = response.get_json()["error"]["message"]
        assert "10000x10000" in message and "MAX_IMAGE_PIXELS" in message and str(max_pixels) in message
    assert min(growths) < 50, f"the refused bomb still cost {growths} MB"


def test_animated_gif_costs_one_frame(client):
    started = time.perf_counter()
    check_outcome(upload(client, seed("gif_animated_3000"), "upload.bin"))
    assert time.perf_counter() - started < 1.0, "only the first of 3000 frames should be decoded"


@pytest.mark.parametrize("name", ["png_1x100000", "png_100000x1"])
def test_extreme_aspect_ratio_stays_cheap(name, client):
    """A 100,000-pixel image must cost about what 100,000 pixels cost.

    Resizing the short side to the model's input size first (1 -> 64 here, 1 -> 224 for ViT-B/32)
    would make the long side 6.4 (22.4) million pixels: gigabytes for a file of a few hundred bytes.
    """
    upload(client, seed("png_1x1"), "upload.bin")  # warm up the model path
    responses, timings = [], []

    def send():
        started = time.perf_counter()
        with no_hang(HANG_SECONDS):
            responses.append(upload(client, seed(name), "upload.bin"))
        timings.append(time.perf_counter() - started)

    peaks = peak_growths(send, RSS_GROWTH_LIMIT_MB)
    assert [check_outcome(response) for response in responses] == [200] * len(responses)
    # the quickest attempt, as for memory: another job on the machine only ever slows one down
    assert min(timings) < 1.0, f"{name} took {', '.join(f'{elapsed:.2f}' for elapsed in timings)} s"
    shown = ", ".join(f"+{peak:.0f}" for peak in peaks)
    print(f"\n[fuzz] {name}: HTTP {responses[-1].status_code}, peak RSS {shown} MB")
    assert min(peaks) < RSS_GROWTH_LIMIT_MB, f"{name} ({len(seed(name))} bytes) peaked at {shown} MB"


# ----------------------------------------------------------------------------------------------
# Mutations. Each takes the strategy's `draw`, the bytes and the seed name; returns new bytes.

INTERESTING_SIZES = [0, 1, 2, 7, 255, 256, 4095, 65_535, 65_536, 100_000, 2**31 - 1, 2**31, 2**32 - 1]
INTERESTING_SIZES_16 = [0, 1, 2, 255, 256, 4_000, 32_767, 32_768, 65_535]


def _position(draw, data: bytes) -> int:
    """An offset, biased toward the first 256 bytes, where the headers are."""
    if not data:
        return 0
    limit = len(data) - 1
    if draw(st.booleans()):
        limit = min(limit, 255)
    return draw(st.integers(0, limit))


def truncate(draw, data: bytes, name: str) -> bytes:
    return data[:draw(st.integers(0, max(0, len(data) - 1)))]


def flip_bits(draw, data: bytes, name: str) -> bytes:
    if not data:
        return data
    mutated = bytearray(data)
    for _ in range(draw(st.integers(1, 20))):
        mutated[_position(draw, data)] ^= 1 << draw(st.integers(0, 7))
    return bytes(mutated)


def overwrite(draw, data: bytes, name: str) -> bytes:
    if not data:
        return data
    at = _position(draw, data)
    patch = draw(st.binary(min_size=1, max_size=64))
    return data[:at] + patch[: len(data) - at] + data[at + len(patch):]


def insert(draw, data: bytes, name: str) -> bytes:
    at = _position(draw, data)
    return data[:at] + draw(st.binary(min_size=1, max_size=256)) + data[at:]


def _png_chunks(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each well-formed chunk of a PNG, in order."""
    chunks, offset = [], len(PNG_SIGNATURE)
    while offset + 12 <= len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        end = offset + 12 + length
        if end > len(data):
            break
        chunks.append((offset, end))
        offset = end
    return chunks


def duplicate_chunk(draw, data: bytes, name: str) -> bytes:
    """A PNG chunk (IHDR, PLTE, IDAT, tRNS...) inserted again elsewhere; else any byte range."""
    if not data:
        return data
    chunks = _png_chunks(data) if data.startswith(PNG_SIGNATURE) else []
    if chunks and draw(st.booleans()):
        start, end = draw(st.sampled_from(chunks))
        boundaries = [len(PNG_SIGNATURE)] + [stop for _, stop in chunks]
        at = draw(st.sampled_from(boundaries))
    else:
        start = draw(st.integers(0, len(data) - 1))
        end = min(len(data), start + draw(st.integers(1, 4096)))
        at = draw(st.integers(0, len(data)))
    copies = draw(st.integers(1, 4))
    return data[:at] + data[start:end] * copies + data[at:]


def _set(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    size = struct.calcsize(fmt)
    if offset + size > len(data):
        return data
    return data[:offset] + struct.pack(fmt, value) + data[offset + size:]


def _size_value(draw, bits: int) -> int:
    interesting = INTERESTING_SIZES if bits == 32 else INTERESTING_SIZES_16
    return draw(st.one_of(st.sampled_from(interesting), st.integers(0, 2**bits - 1)))


def tamper_png(draw, data: bytes) -> bytes:
    chunks = _png_chunks(data)
    if not chunks or data[chunks[0][0] + 4:chunks[0][0] + 8] != b"IHDR":
        return overwrite(draw, data, "png")
    start = chunks[0][0]
    fields = bytearray(data[start + 8:start + 21])  # width, height, depth, colour, compression...
    field = draw(st.sampled_from(["width", "height", "both", "depth", "colour", "interlace"]))
    if field in ("width", "both"):
        fields[0:4] = struct.pack(">I", _size_value(draw, 32))
    if field in ("height", "both"):
        fields[4:8] = struct.pack(">I", _size_value(draw, 32))
    if field == "depth":
        fields[8] = draw(st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, 255]))
    if field == "colour":
        fields[9] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 255]))
    if field == "interlace":
        fields[12] = draw(st.integers(0, 255))
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(fields)) & 0xFFFFFFFF)  # the CRC stays valid
    return data[:start + 8] + bytes(fields) + crc + data[start + 25:]


BMP_FIELDS = {  # name -> (offset, struct format)
    "bfSize": (2, "<I"), "bfOffBits": (10, "<I"), "biSize": (14, "<I"), "biWidth": (18, "<i"),
    "biHeight": (22, "<i"), "biPlanes": (26, "<H"), "biBitCount": (28, "<H"),
    "biCompression": (30, "<I"), "biSizeImage": (34, "<I"), "biClrUsed": (46, "<I"),
}


def tamper_bmp(draw, data: bytes) -> bytes:
    name = draw(st.sampled_from(sorted(BMP_FIELDS)))
    offset, fmt = BMP_FIELDS[name]
    if fmt == "<H":
        value = draw(st.sampled_from([0, 1, 2, 4, 8, 15, 16, 24, 32, 64, 65_535]))
    elif fmt == "<i":
        value = draw(st.one_of(st.sampled_from([0, 1, -1, -65_536, 65_536, 2**31 - 1, -(2**31)]),
                               st.integers(-(2**31), 2**31 - 1)))
    else:
        value = _size_value(draw, 32)
    return _set(data, offset, fmt, value)


def tamper_gif(draw, data: bytes) -> bytes:
    field = draw(st.sampled_from(["screen width", "screen height", "both", "packed"]))
    if field in ("screen width", "both"):
        data = _set(data, 6, "<H", _size_value(draw, 16))
    if field in ("screen height", "both"):
        data = _set(data, 8, "<H", _size_value(draw, 16))
    if field == "packed":
        data = _set(data, 10, "<B", draw(st.integers(0, 255)))
    return data


def tamper_jpeg(draw, data: bytes) -> bytes:
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        sof = data.find(marker)
        if sof > 0:
            break
    else:
        return overwrite(draw, data, "jpeg")
    field = draw(st.sampled_from(["height", "width", "precision", "components"]))
    offset, fmt = {"precision": (sof + 4, ">B"), "height": (sof + 5, ">H"), "width": (sof + 7, ">H"),
                   "components": (sof + 9, ">B")}[field]
    bits = 16 if fmt == ">H" else 8
    value = _size_value(draw, 16) if bits == 16 else draw(st.integers(0, 255))
    return _set(data, offset, fmt, value)


def tamper_webp(draw, data: bytes) -> bytes:
    field = draw(st.sampled_from(["riff size", "chunk size", "vp8 width", "vp8 height"]))
    if field == "riff size":
        return _set(data, 4, "<I", _size_value(draw, 32))
    if field == "chunk size":
        return _set(data, 16, "<I", _size_value(draw, 32))
    if data[12:16] != b"VP8 ":
        return overwrite(draw, data, "webp")
    return _set(data, 26 if field == "vp8 width" else 28, "<H", _size_value(draw, 16))


def tamper_header(draw, data: bytes, name: str) -> bytes:
    """A header field set to a drawn value, per format (checksums fixed where the format has one)."""
    if data.startswith(PNG_SIGNATURE):
        return tamper_png(draw, data)
    if data.startswith(b"BM"):
        return tamper_bmp(draw, data)
    if data.startswith(b"GIF8"):
        return tamper_gif(draw, data)
    if data.startswith(b"\xff\xd8"):
        return tamper_jpeg(draw, data)
    if data.startswith(b"RIFF"):
        return tamper_webp(draw, data)
    return overwrite(draw, data, name)


MUTATORS = {
    "truncation": [truncate],
    "bit_flips": [flip_bits],
    "overwrite_insert": [overwrite, insert],
    "chunk_duplication": [duplicate_chunk],
    "header_tampering": [tamper_header],
}
# Header tampering needs a header: every seed in a supported format (the bombs included).
HEADER_SEEDS = [name for name in SEEDS if EXPECTED[name][0] == 200 or name.startswith("png_")]


@st.composite
def mutated_cases(draw, strategy: str):
    seeds = HEADER_SEEDS if strategy == "header_tampering" else list(SEEDS)
    name = draw(st.sampled_from(seeds))
    data = seed(name)
    mutators = MUTATORS[strategy]
    for _ in range(draw(st.integers(1, 2))):
        mutate = draw(st.sampled_from(mutators))
        data = mutate(draw, data, name)
    return name, data


@pytest.mark.parametrize("strategy", list(FUZZ_EXAMPLES))
def test_fuzz_upload(strategy, client):
    outcomes: Counter = Counter()
    slowest = [0.0, ""]

    @hypothesis_settings(max_examples=FUZZ_EXAMPLES[strategy], deadline=DEADLINE_MS, derandomize=True,
                         database=None, print_blob=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=mutated_cases(strategy))
    def fuzz(case):
        name, data = case
        note(f"seed {name}, {len(data)} bytes, first 64: {data[:64]!r}")
        started = time.perf_counter()
        with no_hang(HANG_SECONDS):
            response = upload(client, data, "upload.bin")
        elapsed = time.perf_counter() - started
        if elapsed > slowest[0]:
            slowest[:] = [elapsed, name]
        outcomes[check_outcome(response)] += 1

    reset_peak_rss()
    fuzz()
    peak = peak_rss_mb()
    cases, first_pass = sum(outcomes.values()), outcomes.copy()
    # What the first pass allocated for good (thread arenas, caches, the allocator's high-water mark)
    # is no leak; a leak grows the heap again when the same cases (derandomized) run a second time.
    before = anonymous_rss_mb()
    fuzz()
    after = anonymous_rss_mb()
    outcomes.clear()
    outcomes.update(first_pass)
    TOTALS.update(outcomes)
    TOTALS["cases"] += cases
    counts = ", ".join(f"{status}: {count}" for status, count in sorted(outcomes.items()))
    print(f"\n[fuzz] {strategy}: {cases} cases; by status {counts}; slowest {slowest[0]:.2f} s "
          f"({slowest[1]}); anonymous RSS over a second pass {before:.0f} -> {after:.0f} MB "
          f"(peak of all RSS {peak:.0f} MB)")
    assert cases == FUZZ_EXAMPLES[strategy], "hypothesis ran another number of cases than asked"
    assert set(outcomes) <= {200, 400}, f"a mutated image is decoded (200) or refused (400): {outcomes}"
    assert after - before < FUZZ_LEAK_LIMIT_MB, f"the heap grew {after - before:.0f} MB over the second pass"
