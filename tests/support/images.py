"""Image bytes for every test: flat-colour images and given pictures encoded in memory, a real photo,
and hand-built PNG headers. `image_bytes` is the one builder of a plain test image."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Quadrant colours of `quadrants()`: top-left, top-right, bottom-left, bottom-right.
RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 200, 40), (30, 40, 210), (230, 220, 30)


def encode(image: Image.Image | np.ndarray, fmt: str, **options) -> bytes:
    """An image (or an array) encoded in `fmt` by Pillow."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (120, 90),
                colour: tuple[int, int, int] | str = (200, 30, 30), **options) -> bytes:
    """A flat-colour RGB image of `size` (width, height), encoded in `fmt`."""
    return encode(Image.new("RGB", size, colour), fmt, **options)


def quadrants(width: int = 32, height: int = 24) -> Image.Image:
    """An RGB image of four flat quadrants, so lossy formats still keep recognisable colours."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = RED
    pixels[: height // 2, width // 2 :] = GREEN
    pixels[height // 2 :, : width // 2] = BLUE
    pixels[height // 2 :, width // 2 :] = YELLOW
    return Image.fromarray(pixels)


def cat_photo() -> np.ndarray:
    """skimage's Chelsea the cat, 451x300 RGB."""
    import skimage.data

    return skimage.data.chelsea()


def cat_png() -> bytes:
    return encode(cat_photo(), "PNG")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_declaring(width: int, height: int) -> bytes:
    """A small, well-formed PNG (valid CRCs) whose IHDR claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * 3 * min(width, 16)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(row))
            + png_chunk(b"IEND", b""))
