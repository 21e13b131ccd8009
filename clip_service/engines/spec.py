"""What a CLIP_MODEL value names: its accepted forms, parsed into a ModelSpec, and the weights' identity.

No torch here: settings validate CLIP_MODEL with this module, and reading settings must stay light. Only
the ARCH:PRETRAINED form asks open_clip (and so torch) for its list of pretrained tags, when one is parsed.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"  # open_clip's own prefix for a folder of config and weights

# OpenAI's names -> open_clip architecture. OpenAI trained with QuickGELU, so the -quickgelu configs
# are the ones that reproduce its weights exactly.
OPENAI_MODELS = {
    "ViT-B/32": "ViT-B-32-quickgelu",
    "ViT-B/16": "ViT-B-16-quickgelu",
    "ViT-L/14": "ViT-L-14-quickgelu",
    "ViT-L/14@336px": "ViT-L-14-336-quickgelu",
    "RN50": "RN50-quickgelu",
    "RN101": "RN101-quickgelu",
    "RN50x4": "RN50x4-quickgelu",
    "RN50x16": "RN50x16-quickgelu",
    "RN50x64": "RN50x64-quickgelu",
}
KNOWN_FORMS = (
    ", ".join(OPENAI_MODELS)
    + ", an open_clip ARCH:PRETRAINED pair (e.g. ViT-B-32:laion2b_s34b_b79k), hf-hub:org/repo"
    " or local-dir:/path"
)
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pth")
_HF_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")


class ModelSpecError(ValueError):
    """A CLIP_MODEL value the service refuses; the message is a whole sentence that names it."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed CLIP_MODEL value: what open_clip is asked for."""

    name: str  # as the operator wrote it
    open_clip_name: str  # model_name for open_clip (may carry hf-hub: or local-dir:)
    pretrained: str | None  # pretrained tag when open_clip_name is a built-in architecture

    @property
    def weights_source(self) -> str:
        """Whose weights these are: "OpenAI" for OpenAI's own, "OpenCLIP" for every other model."""
        return "OpenAI" if self.pretrained == "openai" else "OpenCLIP"

    @property
    def local_dir(self) -> Path | None:
        name = self.open_clip_name
        return Path(name[len(LOCAL_DIR_PREFIX):]) if name.startswith(LOCAL_DIR_PREFIX) else None

    @property
    def hf_repo(self) -> str | None:
        name = self.open_clip_name
        return name[len(HF_HUB_PREFIX):] if name.startswith(HF_HUB_PREFIX) else None


def weight_files(folder: Path) -> list[Path]:
    return sorted(path for pattern in WEIGHT_FILES for path in folder.glob(pattern))


# open_clip's choice among a folder's weight files (factory._find_checkpoint_in_dir), first found wins
PREFERRED_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                     "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def chosen_weights(folder: Path) -> Path:
    """The weights file open_clip loads from a local-dir: folder that has at least one."""
    found = weight_files(folder)
    preferred = [path for path in found if path.name in PREFERRED_WEIGHTS]
    if preferred:
        return min(preferred, key=lambda path: PREFERRED_WEIGHTS.index(path.name))
    return sorted(found, key=lambda path: path.suffix != ".safetensors")[0]


def public_model_name(name: str) -> str:
    """CLIP_MODEL as clients see it: a local-dir: model by its folder's name, not the server's path."""
    if name.startswith(LOCAL_DIR_PREFIX):
        return LOCAL_DIR_PREFIX + Path(name[len(LOCAL_DIR_PREFIX):].rstrip("/")).name
    return name


def parse_model_spec(raw: str) -> ModelSpec:
    """Parse CLIP_MODEL; a ModelSpecError's message is a sentence starting "CLIP_MODEL=<raw> "."""
    name = raw.strip()
    if name in OPENAI_MODELS:
        return ModelSpec(name, OPENAI_MODELS[name], "openai")
    if name.startswith(HF_HUB_PREFIX):
        if not _HF_REPO.match(name[len(HF_HUB_PREFIX):]):
            raise ModelSpecError(f"CLIP_MODEL={raw} is not a Hugging Face repository; "
                                 "allowed: hf-hub:org/repo")
        return ModelSpec(name, name, None)
    if name.startswith(LOCAL_DIR_PREFIX):
        return ModelSpec(name, f"{LOCAL_DIR_PREFIX}{_checked_folder(raw, name)}", None)
    if name.count(":") == 1:
        import open_clip  # the ARCH:PRETRAINED form is open_clip's own list; importing it loads torch

        arch, tag = name.split(":")
        if (arch, tag) in open_clip.list_pretrained():
            return ModelSpec(name, arch, tag)
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tags:
            raise ModelSpecError(f"CLIP_MODEL={raw} is not a known pretrained tag of {arch}; "
                                 f"known: {', '.join(tags)}")
    raise ModelSpecError(f"CLIP_MODEL={raw} is not a known model; known: {KNOWN_FORMS}")


def _checked_folder(raw: str, name: str) -> Path:
    """The resolved folder of a local-dir: value, if it holds a config and weights."""
    folder = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()
    if not folder.is_dir():
        raise ModelSpecError(f"CLIP_MODEL={raw} names no folder; allowed: local-dir:/path to a folder "
                             "holding open_clip_config.json and open_clip_model.safetensors")
    if not (folder / "open_clip_config.json").is_file():
        raise ModelSpecError(f"CLIP_MODEL={raw} has no open_clip_config.json; a local-dir: folder "
                             "holds open_clip_config.json and open_clip_model.safetensors")
    if not weight_files(folder):
        raise ModelSpecError(f"CLIP_MODEL={raw} holds no weights (open_clip_model.safetensors); a "
                             "randomly initialised model is never served")
    unreadable = [path.name for path in (folder / "open_clip_config.json", chosen_weights(folder))
                  if not os.access(path, os.R_OK)]
    if unreadable:  # open_clip would report a file it cannot read as one that is not there
        raise ModelSpecError(f"CLIP_MODEL={raw}: {', '.join(unreadable)} cannot be read by the user the "
                             f"service runs as (uid {os.getuid()}); give that user read access "
                             "(for example chmod o+r, or a group it belongs to)")
    return folder.resolve()


def model_identity(spec: ModelSpec) -> str:
    """A string that changes whenever the weights may have changed; keys the label-feature cache."""
    folder = spec.local_dir
    if folder is None:
        return f"{spec.open_clip_name}|{spec.pretrained}"
    digest = hashlib.sha256((folder / "open_clip_config.json").read_bytes())
    for path in weight_files(folder):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"local-dir:{folder}|{digest.hexdigest()}"
