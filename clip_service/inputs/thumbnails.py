"""Small JPEG previews of indexed photos for the page's search results, read as safely as `file=`.

A thumbnail is served only for a path the photo index holds, and the file is opened beneath the
indexed folder by the same code as `file=` (realpath check, then openat2 RESOLVE_BENEATH), so neither
`..` nor a symlink swapped in later reaches anything outside that folder.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

from PIL import Image

from clip_service.errors import DeadlineExceeded, Forbidden, NotFound, ServiceError
from clip_service.inputs.images import ImageLimits, check_file_access, decode_image, read_file

THUMBNAIL_SIDE = 256  # pixels, the longer side
JPEG_QUALITY = 82


def thumbnail_jpeg(folder: Path, relative: str, limits: ImageLimits, side: int = THUMBNAIL_SIDE,
                   deadline: float | None = None) -> bytes:
    """The image at folder/relative, at most side x side pixels, as JPEG bytes.

    Errors name the path as the client gave it, never the server's folder. `deadline`
    (time.monotonic()) is checked before the decode, and bounds its wait for decode memory, as the
    other routes' images are.
    """
    raw = str(folder / relative)
    try:
        real = check_file_access(raw, (folder,), private=False)
        data = read_file(raw, real, limits.max_bytes, (folder,))
    except Forbidden:
        raise Forbidden(f"{relative} leads outside the indexed folder") from None
    except NotFound:
        raise NotFound(f"{relative} is no longer in the indexed folder; index it again") from None
    except ServiceError as error:  # its message names the server's path (perhaps shortened): never shown
        raise type(error)(f"{relative} cannot be read as an image file") from None
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"The request's time ran out before {relative} could be decoded "
                               "(REQUEST_TIMEOUT)")

    def small_jpeg(image: Image.Image) -> bytes:
        image.thumbnail((side, side), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()

    return decode_image(data, limits, (side, side), small_jpeg, deadline)  # its errors name no path
