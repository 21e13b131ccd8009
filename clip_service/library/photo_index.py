"""The photo index file: every image's embedding with its path, the indexed folder and the model.

One safetensors file: `embeddings`, (N, D) float32 unit vectors (exactly what /embed gives for each
image), and `paths`, the N paths relative to the folder as file-system bytes joined by NUL (any file
name survives, and no JSON header grows with the library). The metadata names the format, the model
(CLIP_MODEL and the weights' identity) and the folder. Readers map the embeddings into memory
read-only, so the server's workers share one copy through the page cache: 4 x D bytes per image
(2 KiB for ViT-B/32's 512 dimensions) plus its path. A large index also holds `hnsw`, the approximate
index of those vectors (library/approximate.py), mapped and shared the same way; readers that predate
it ignore it and search exactly.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from clip_service.atomic_files import write_atomically
from clip_service.library.approximate import ApproximateIndex, ApproximateIndexError, build

INDEX_FORMAT = "clip-service-photo-index-v1"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class PhotoIndexError(Exception):
    """An index that cannot be used here; the message is one line that says why and what to do."""


@dataclass(frozen=True)
class PhotoIndex:
    """An index as read: paths[i] is the image whose unit embedding is embeddings[i]."""

    file: Path
    folder: Path  # the indexed folder, absolute
    model: str  # CLIP_MODEL when it was made
    model_identity: str  # engines.spec.model_identity of those weights
    paths: tuple[str, ...]
    embeddings: np.ndarray  # (N, D) float32, read-only
    approximate: ApproximateIndex | None = None  # the HNSW index of `embeddings`, when the file has one

    @property
    def dimensions(self) -> int:
        return int(self.embeddings.shape[1])

    @functools.cached_property
    def row_of(self) -> dict[str, int]:
        return {path: row for row, path in enumerate(self.paths)}

    @functools.cached_property
    def shown_paths(self) -> tuple[str, ...]:
        """The paths as answers show them (JSON): see shown_path; `paths` itself when all are UTF-8."""
        shown = tuple(shown_path(path) for path in self.paths)
        return self.paths if all(a is b for a, b in zip(shown, self.paths, strict=True)) else shown

    @functools.cached_property
    def row_of_shown(self) -> dict[str, int]:
        """A path as an answer showed it -> its row, so a client can ask for what it was shown."""
        if self.shown_paths is self.paths:
            return self.row_of
        return {path: row for row, path in enumerate(self.shown_paths)}

    def check_model(self, model: str, model_identity: str) -> None:
        """Refuse to compare this index's vectors with another model's: they mean nothing to each other."""
        if model_identity == self.model_identity:
            return
        same_name = model == self.model
        raise PhotoIndexError(
            f"{self.file} was indexed with {'other weights of ' if same_name else ''}CLIP_MODEL={self.model}"
            f"{'' if same_name else f', and this uses CLIP_MODEL={model}'}; an index only works with the "
            f"model that made it: index again with `python -m clip_service index {self.folder} -o "
            f"{self.file} --overwrite`{'' if same_name else f', or set CLIP_MODEL={self.model}'}")


def shown_path(path: str) -> str:
    r"""A file name as answers can carry it: os.fsdecode keeps the bytes of a name that is not UTF-8 as
    lone surrogates, which UTF-8 cannot encode; they are shown as \xNN (b"caf\xe9.png" as caf\xe9.png)."""
    try:
        path.encode("utf-8")
        return path  # the same object: a million plain names cost no second copy
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_index(file: Path, folder: Path, model: str, model_identity: str, paths: list[str],
                embeddings: np.ndarray, approximate: bool = False) -> None:
    """Write atomically (a temporary file renamed over `file`): a reader never sees half an index.
    `approximate`: build the HNSW index of the embeddings into the file too."""
    if len(paths) != len(embeddings) or embeddings.ndim != 2:
        raise ValueError(f"{len(paths)} paths for embeddings of shape {embeddings.shape}")
    joined = b"\0".join(os.fsencode(path) for path in paths)
    tensors = {"embeddings": np.ascontiguousarray(embeddings, dtype="<f4"),
               "paths": np.frombuffer(joined, dtype=np.uint8).copy()}
    metadata = {"format": INDEX_FORMAT, "model": model, "model_identity": model_identity,
                "folder": str(folder), "count": str(len(paths))}
    if approximate and len(paths):
        tensors["hnsw"] = build(tensors["embeddings"])
    write_atomically(file, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def read_index(file: Path) -> PhotoIndex:
    """The index in `file`, its embeddings memory-mapped; PhotoIndexError if it is not a usable index."""
    file = Path(file)
    try:
        with open(file, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header_size = struct.unpack("<Q", handle.read(8))[0] if size >= 8 else -1
            if not 0 < header_size <= min(MAX_HEADER_BYTES, size - 8):
                raise PhotoIndexError(f"{file} is not a photo index (made by python -m clip_service index)")
            header = json.loads(handle.read(header_size))
            metadata = header.get("__metadata__") or {}
            if metadata.get("format") != INDEX_FORMAT:
                raise PhotoIndexError(f"{file} is not a photo index of this version ({INDEX_FORMAT}); make "
                                      "it again with python -m clip_service index")
            start = 8 + header_size
            embeddings = _tensor(file, header, "embeddings", "F32", 2, start, size)
            path_bytes = _tensor(file, header, "paths", "U8", 1, start, size)
            data = bytes(path_bytes)
            paths = tuple(os.fsdecode(part) for part in data.split(b"\0")) if data else ()
            if len(paths) != len(embeddings):
                raise PhotoIndexError(f"{file} is damaged: {len(paths)} paths for {len(embeddings)} "
                                      "embeddings")
            approximate = None
            if "hnsw" in header:
                graph = _tensor(file, header, "hnsw", "U8", 1, start, size)
                approximate = ApproximateIndex(graph, len(paths), embeddings.shape[1], file)
            return PhotoIndex(file.resolve(), Path(metadata["folder"]), str(metadata["model"]),
                              str(metadata["model_identity"]), paths, embeddings, approximate)
    except FileNotFoundError:
        raise PhotoIndexError(f"{file} does not exist; make it with python -m clip_service index FOLDER "
                              f"-o {file}") from None
    except OSError as error:
        raise PhotoIndexError(f"{file} cannot be read: {error.strerror}") from None
    except ApproximateIndexError as error:
        raise PhotoIndexError(f"{error}; make it again with python -m clip_service index") from None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, ArithmeticError, struct.error):
        raise PhotoIndexError(f"{file} is damaged or not a photo index; make it again with python -m "
                              "clip_service index") from None


def read_model_index(file: Path, model: str, model_identity: str) -> PhotoIndex:
    """The index in `file`, for searching with `model` (CLIP_MODEL, and its weights' identity): one
    made by another model is refused (PhotoIndexError), as every reader of an index must."""
    index = read_index(file)
    index.check_model(model, model_identity)
    return index


def _tensor(file: Path, header: dict, name: str, dtype: str, ndim: int, start: int,
            size: int) -> np.ndarray:
    """One tensor of the file, memory-mapped read-only after its place in the file is checked."""
    entry = header[name]
    shape = tuple(int(dimension) for dimension in entry["shape"])
    begin, end = (int(offset) for offset in entry["data_offsets"])
    item = {"F32": 4, "U8": 1}[dtype]
    if (entry["dtype"] != dtype or len(shape) != ndim or end - begin != item * int(np.prod(shape))
            or start + end > size or begin < 0):
        raise ValueError(f"{name} is not a {dtype} tensor of {ndim} dimensions within the file")
    if begin == end:
        return np.zeros(shape, dtype="<f4" if dtype == "F32" else np.uint8)
    return np.memmap(file, dtype="<f4" if dtype == "F32" else np.uint8, mode="r", offset=start + begin,
                     shape=shape)
