"""Turning an upload, a server path or URL bytes into an RGB image, refusing what is unsafe.

The format is recognised from the content, never from a file name or Content-Type. Pixel counts are
checked from the header before any pixels are allocated, so a small file that claims 30,000 x 30,000
pixels costs nothing.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clip_service.errors import BadInput, Forbidden, NotFound, TooLarge

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


def decode_image(data: bytes, limits: ImageLimits,
                 draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Bytes -> an RGB image with EXIF orientation applied (first frame of an animation).

    With `draft_size` (the model's input height and width), a JPEG is decoded straight to the
    smallest DCT scale (1/2, 1/4, 1/8) that still covers twice that size: about three times faster
    for a 12 MP photo, and the model's own resize then sees nearly the same pixels.
    """
    if not data:
        raise BadInput("The image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise TooLarge(f"The image is {len(data)} bytes; the limit is {limits.max_bytes} "
                       "(MAX_IMAGE_BYTES)")
    try:
        image = Image.open(io.BytesIO(data), formats=OPENERS)
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
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise BadInput(f"The image has too many pixels: {error}") from None
    except DECODE_ERRORS as error:
        raise BadInput(f"The {SUPPORTED_FORMATS[image.format]} image could not be decoded: "
                       f"{_reason(error)}") from None


def _reason(error: Exception) -> str:
    return str(error)[:200] or type(error).__name__


def to_rgb(image: Image.Image) -> Image.Image:
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
        image = _high_depth_to_grey(image)
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _high_depth_to_grey(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale -> 8-bit, scaled rather than clipped at 255."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
    else:
        scaled = values / 257.0 if values.max(initial=0) > 255 or "16" in image.mode else values
    return Image.fromarray(np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8), "L")


def shown(path: str, limit: int = 200) -> str:
    """A path as error messages show it: shortened when very long."""
    return path if len(path) <= limit else f"{path[:limit // 2]}...{path[-limit // 2:]}"


def check_file_access(raw_path: str, allowed_roots: tuple[Path, ...], private: bool) -> Path:
    """The real path of a `file=` value, if the configuration lets clients read it."""
    if "\x00" in raw_path:
        raise BadInput("file contains a NUL byte")
    if not os.path.isabs(raw_path):
        raise BadInput(f"file must be an absolute path, not {shown(raw_path)!r}")
    real = Path(os.path.realpath(raw_path))  # symlinks and .. resolved before the root check
    if not allowed_roots:
        if not private:
            raise Forbidden("File input is disabled on a public service; set ALLOWED_FILE_ROOTS to "
                            "the folders clients may read (or run with PRIVATE=True)")
        return real
    if not any(real.is_relative_to(root) for root in allowed_roots):
        raise Forbidden(f"File {shown(raw_path)} is outside the allowed folders (ALLOWED_FILE_ROOTS)")
    return real


def read_file(raw_path: str, real: Path, max_bytes: int) -> bytes:
    """Read a regular file up to max_bytes; never blocks on a FIFO or device."""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise NotFound(f"File not found: {shown(raw_path)}") from None
    except PermissionError:
        raise Forbidden(f"File is not readable by the service: {shown(raw_path)}") from None
    except OSError as error:
        raise BadInput(f"File cannot be opened: {shown(raw_path)} ({error.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise BadInput(f"Not a regular file: {shown(raw_path)}")
    if info.st_size > max_bytes:
        os.close(fd)
        raise TooLarge(f"File is {info.st_size} bytes; the limit is {max_bytes} (MAX_IMAGE_BYTES)")
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(max_bytes + 1)
        except OSError as error:
            raise BadInput(f"File cannot be read: {shown(raw_path)} ({error.strerror})") from None
    if len(data) > max_bytes:
        raise TooLarge(f"File is over the limit of {max_bytes} bytes (MAX_IMAGE_BYTES)")
    return data
