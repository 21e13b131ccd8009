"""Turning an upload, a server path or URL bytes into an RGB image, refusing what is unsafe.

The format is recognised from the content, never from a file name or Content-Type. Pixel counts are
checked from the header before any pixels are allocated, so a small file that claims 30,000 x 30,000
pixels costs nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clip_service.errors import BadInput, DeadlineExceeded, Forbidden, NotFound, ServiceError, TooLarge
from clip_service.inputs.budget import MB, DecodeBudget
from clip_service.settings import Settings

# Pillow format name -> the name clients know. MPO is the multi-picture JPEG many phones write.
SUPPORTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "GIF": "GIF", "BMP": "BMP",
                     "WEBP": "WebP"}
SUPPORTED_LIST = "PNG, JPEG, GIF, BMP, WebP"
WHITE = (255, 255, 255)
Image.init()  # register every plugin now, so Image.open(formats=...) knows them all
# Pillow's own bomb check is global and fixed; decode_image checks MAX_IMAGE_PIXELS itself, right
# after the header is parsed and before any pixel is allocated.
Image.MAX_IMAGE_PIXELS = None
# What Pillow's decoders raise on truncated or crafted files.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
OPENERS = [name for name in SUPPORTED_FORMATS if name in Image.OPEN]


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    budget: DecodeBudget | None = None  # the worker's (or the library run's) decode memory; None: unbounded

    @classmethod
    def of(cls, settings: Settings) -> ImageLimits:
        """The settings' limits with a decode budget of their own: one per worker or library run."""
        return cls(settings.max_image_bytes, settings.max_image_pixels,
                   DecodeBudget(settings.decode_memory_mb * MB))


def decode_image(data: bytes, limits: ImageLimits, draft_size: tuple[int, int] | None = None,
                 prepare: Callable[[Image.Image], Any] | None = None, deadline: float | None = None) -> Any:
    """Bytes -> an RGB image with EXIF orientation applied (first frame of an animation), or with
    `prepare` what it makes of that image (the model's input, a thumbnail).

    The decode's memory is reserved in `limits.budget` from before the pixels are allocated until
    `prepare` has made its small result, so the full-size image never outlives its reservation.
    `deadline` (time.monotonic()) bounds the wait for that memory.

    With `draft_size` (the model's input height and width), a JPEG is decoded straight to the
    smallest DCT scale (1/2, 1/4, 1/8) that still covers twice that size: about three times faster
    for a 12 MP photo, and the model's own resize then sees nearly the same pixels.
    """
    image = _opened(data, limits, draft_size, deadline)
    reservation = contextlib.nullcontext() if limits.budget is None else limits.budget.reserved(
        decode_peak_bytes(image), deadline, f"The {image.size[0]}x{image.size[1]} {image.mode} image")
    with reservation:
        rgb = _loaded_rgb(image, deadline)
        del image  # the decoded original, when a conversion made a new image, goes before `prepare`
        return rgb if prepare is None else prepare(rgb)


class _DeadlineBytes(io.BytesIO):
    """The image's bytes as Pillow reads them while it decodes: no read after the deadline, so a decode
    is cut within one small block (a 7745x7745 PNG of 120 KB inflates 60 MB from two 64 KB reads)."""

    BLOCK = 1 << 13  # what Pillow reads at a time (its decodermaxblock): about 8 MB of a bomb's pixels

    def __init__(self, data: bytes, deadline: float):
        super().__init__(data)
        self.deadline = deadline

    def read(self, size: int | None = -1) -> bytes:
        if time.monotonic() >= self.deadline:
            raise DeadlineExceeded("The request's time ran out while its image was decoded (REQUEST_TIMEOUT)")
        return super().read(size)


def _opened(data: bytes, limits: ImageLimits, draft_size: tuple[int, int] | None,
            deadline: float | None = None) -> Image.Image:
    """The image with only its header read (and a JPEG's DCT scale chosen), checked against the limits;
    with a deadline, its decoding reads the bytes in small blocks and stops at the deadline."""
    if not data:
        raise BadInput("The image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise TooLarge(f"The image is {len(data)} bytes; the limit is {limits.max_bytes} "
                       "(MAX_IMAGE_BYTES)")
    try:
        image = Image.open(io.BytesIO(data) if deadline is None else _DeadlineBytes(data, deadline),
                           formats=OPENERS)
    except UnidentifiedImageError:
        raise BadInput(f"Not an image, or an unsupported format; supported: {SUPPORTED_LIST}") from None
    except DECODE_ERRORS as error:
        raise BadInput(f"The image could not be decoded: {_reason(error)}") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise BadInput(f"The image is {width}x{height} pixels; the limit is {limits.max_pixels} "
                       "pixels (MAX_IMAGE_PIXELS)")
    if width < 1 or height < 1:
        raise BadInput(f"The image has no pixels ({width}x{height})")
    try:
        image.seek(0)
        if draft_size and image.format in ("JPEG", "MPO"):
            # At least twice the model input: a DCT scale just above it (640x480 -> 320x240 for 224)
            # leaves the model's resize almost nothing to smooth, and the input drifts by 2 grey
            # levels on average; from twice the size on it stays under 0.5.
            side = 2 * max(draft_size)
            image.draft("RGB", (side, side))
    except DECODE_ERRORS as error:
        raise BadInput(f"The {SUPPORTED_FORMATS[image.format]} image could not be decoded: "
                       f"{_reason(error)}") from None
    if deadline is not None:
        image.decodermaxblock = _DeadlineBytes.BLOCK
    return image


def _loaded_rgb(image: Image.Image, deadline: float | None = None) -> Image.Image:
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # not a copy: a huge image exists only once
        return to_rgb(image, deadline)
    except Image.DecompressionBombError as error:
        raise BadInput(f"The image has too many pixels: {error}") from None
    except DECODE_ERRORS as error:
        raise BadInput(f"The {SUPPORTED_FORMATS[image.format]} image could not be decoded: "
                       f"{_reason(error)}") from None


def _bytes_per_pixel(mode: str) -> int:
    """What Pillow allocates per pixel in this mode (every 3- and 4-channel mode takes 4 bytes)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


ORIENTATION = 0x0112
HIGH_DEPTH_STRIPS = 24 * (1 << 20)  # _high_depth_to_rgb's strip arrays: a megapixel in a few dtypes


def decode_peak_bytes(image: Image.Image) -> int:
    """The most memory decoding this (header-only) image to RGB holds at once, in bytes.

    Every image the path passes through is counted while it lives: the decoded one, the copy
    exif_transpose makes when the image is turned, and what to_rgb builds for its mode.
    """
    mode = image.mode
    per_pixel = _bytes_per_pixel(mode)
    if _may_be_turned(image):
        per_pixel += _bytes_per_pixel(mode)
    extra = 0
    if mode in ("P", "L", "RGB") and "transparency" in image.info:
        per_pixel += 4 + 4 + 1  # RGBA, the white background, the alpha channel
    elif mode == "RGBA":
        per_pixel += 4 + 1
    elif mode in ("LA", "PA", "RGBa", "La"):
        per_pixel += 4 + 4 + 1
    elif mode.startswith("I") or mode == "F":
        per_pixel += 4
        extra = HIGH_DEPTH_STRIPS
    elif mode != "RGB":
        per_pixel += 4
    width, height = image.size
    return width * height * per_pixel + extra


def _may_be_turned(image: Image.Image) -> bool:
    """Whether exif_transpose may copy the image: its EXIF says so, or (a PNG's eXIf chunk may follow the
    pixels, unread yet) it cannot be known before decoding."""
    exif = image.info.get("exif")
    if exif is None:
        return image.format == "PNG"
    try:
        found = Image.Exif()
        found.load(exif)
        return found.get(ORIENTATION, 1) not in (1, None)
    except DECODE_ERRORS:
        return True


def _reason(error: Exception) -> str:
    return str(error)[:200] or type(error).__name__


def to_rgb(image: Image.Image, deadline: float | None = None) -> Image.Image:
    """Any Pillow mode -> RGB: transparency over white, 16-bit and float scaled, CMYK converted."""
    mode = image.mode
    if mode in ("P", "L", "RGB") and "transparency" in image.info:  # a transparent index or colour
        image = image.convert("RGBA")
        mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGB")
        mode = image.mode
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(image, deadline)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image if mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image, deadline: float | None = None,
                       strip_pixels: int = 1 << 20) -> Image.Image:
    """16-bit, 32-bit and float greyscale -> 8-bit grey RGB, scaled rather than clipped at 255.

    Converted a strip of rows at a time straight into the RGB array, so the temporary arrays stay small
    whatever the image's size (whole-image float64 arrays cost 8 bytes a pixel, several times over).
    The strips of a 60-megapixel image take seconds on a busy core: the deadline is checked between them.
    """
    width, height = image.size
    rows = max(1, strip_pixels // width)
    strips = [(top, min(height, top + rows)) for top in range(0, height, rows)]

    def values(top: int, bottom: int) -> np.ndarray:
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("The request's time ran out while its image was converted to 8 bits "
                                   "(REQUEST_TIMEOUT)")
        return np.asarray(image.crop((0, top, width, bottom)))

    if image.mode == "F":
        extremes = [(float(np.nanmin(strip)), float(np.nanmax(strip)))
                    for strip in (values(top, bottom) for top, bottom in strips)
                    if not np.isnan(strip).all()]
        low = min((low for low, _ in extremes), default=0.0)
        high = max((high for _, high in extremes), default=0.0)
        scale, offset = (255 / (high - low), low) if high > low else (0.0, low)

        def grey(strip: np.ndarray) -> np.ndarray:
            return np.clip(np.nan_to_num((strip.astype(np.float32) - offset) * scale), 0, 255)
    else:  # integers: one pass of Pillow's own for the peak, integer division for the scale
        peak = image.getextrema()[1]
        divisor = 257 if peak > 255 or "16" in image.mode else 1

        def grey(strip: np.ndarray) -> np.ndarray:
            return np.clip(strip // divisor, 0, 255)
    rgb = Image.new("RGB", (width, height))
    for top, bottom in strips:
        rgb.paste(Image.fromarray(grey(values(top, bottom)).astype(np.uint8), "L"), (0, top))
    return rgb


def shown(path: str, limit: int = 200) -> str:
    """A path as error messages show it: shortened when very long."""
    return path if len(path) <= limit else f"{path[:limit // 2]}...{path[-limit // 2:]}"


def check_file_access(raw_path: str, allowed_roots: tuple[Path, ...], private: bool) -> Path:
    """The real path of a `file=` value, if the configuration lets clients read it.

    This check names the problem for the client; `read_file` enforces the roots again when it opens
    the file, so a folder swapped for a symlink in between cannot lead outside them.
    """
    if "\x00" in raw_path:
        raise BadInput("file contains a NUL byte")
    if not os.path.isabs(raw_path):
        raise BadInput(f"file must be an absolute path, not {shown(raw_path)!r}")
    try:
        real = Path(os.path.realpath(raw_path))  # symlinks and .. resolved before the root check
    except OSError as error:  # e.g. a component vanishing while it is resolved
        raise _open_failure(raw_path, error) from None
    if not allowed_roots:
        if not private:
            raise Forbidden("File input is disabled on a public service; set ALLOWED_FILE_ROOTS to "
                            "the folders clients may read (or run with PRIVATE=True)")
        return real
    if not any(real.is_relative_to(root) for root in allowed_roots):
        raise Forbidden(f"File {shown(raw_path)} is outside the allowed folders (ALLOWED_FILE_ROOTS)")
    return real


def read_file(raw_path: str, real: Path, max_bytes: int, allowed_roots: tuple[Path, ...] = ()) -> bytes:
    """Read a regular file up to max_bytes, opened without side effects and without races.

    The file is first opened with O_PATH (a device or FIFO is never really opened), and only a
    regular file is then opened for reading. With `allowed_roots` the path is resolved beneath the
    root that holds it, by the kernel (openat2 RESOLVE_BENEATH), so a symlink swapped in after
    `check_file_access` cannot lead outside the root.
    """
    root = next((root for root in allowed_roots if real.is_relative_to(root)), None)
    try:
        if root is None:
            handle_fd = os.open(real, os.O_PATH | os.O_CLOEXEC)
        else:
            handle_fd = open_beneath(root, str(real.relative_to(root)))
    except OSError as error:
        raise _open_failure(raw_path, error) from None
    try:
        info = os.fstat(handle_fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadInput(f"Not a regular file: {shown(raw_path)}")
        if info.st_size > max_bytes:
            raise TooLarge(f"File is {info.st_size} bytes; the limit is {max_bytes} (MAX_IMAGE_BYTES)")
        try:  # reopening the O_PATH handle reads exactly the file that was checked
            fd = os.open(f"/proc/self/fd/{handle_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            raise _open_failure(raw_path, error) from None
    finally:
        os.close(handle_fd)
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(max_bytes + 1)
        except OSError as error:
            raise BadInput(f"File cannot be read: {shown(raw_path)} ({error.strerror})") from None
    if len(data) > max_bytes:
        raise TooLarge(f"File is over the limit of {max_bytes} bytes (MAX_IMAGE_BYTES)")
    return data


def _open_failure(raw_path: str, error: OSError) -> ServiceError:
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFound(f"File not found: {shown(raw_path)}")
    if error.errno in (errno.EACCES, errno.EPERM):
        return Forbidden(f"File is not readable by the service: {shown(raw_path)}")
    if error.errno in (errno.EXDEV, errno.ELOOP):
        return Forbidden(f"File {shown(raw_path)} leads outside the allowed folders (ALLOWED_FILE_ROOTS)")
    return BadInput(f"File cannot be opened: {shown(raw_path)} ({error.strerror})")


_SYS_OPENAT2 = 437  # one number on every Linux architecture
_RESOLVE_NO_MAGICLINKS, _RESOLVE_BENEATH = 0x02, 0x08
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_beneath(root: Path, relative: str) -> int:
    """An O_PATH handle on root/relative, refusing any path (symlinks included) that leaves root."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
        for _ in range(5):  # EAGAIN: a rename raced the kernel's check of a '..'; ask again
            fd = _libc.syscall(_SYS_OPENAT2, root_fd, os.fsencode(relative), ctypes.byref(how),
                               ctypes.sizeof(how))
            if fd >= 0:
                return fd
            code = ctypes.get_errno()
            if code != errno.EAGAIN:
                break
        if code in (errno.ENOSYS, errno.EPERM):  # kernels before 5.6, or a seccomp filter
            return _walk_beneath(root_fd, relative)
        raise OSError(code, os.strerror(code), relative)
    finally:
        os.close(root_fd)


def _walk_beneath(root_fd: int, relative: str) -> int:
    """openat2's guarantee by hand: component by component, following no symlink at all."""
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), relative)
    current = os.dup(root_fd)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
            following = os.open(part, flags, dir_fd=current)
            os.close(current)
            current = following
            if last and stat.S_ISLNK(os.fstat(current).st_mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), relative)
        return os.dup(current)
    finally:
        os.close(current)
