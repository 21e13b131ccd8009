"""Getting a model's weights into the local cache before any engine is built.

open_clip (and so torch) is imported only when weights are fetched: this runs once, in the process that
starts the server, and never touches CUDA.
"""

from __future__ import annotations

from clip_service.engines.base import ModelLoadError
from clip_service.engines.spec import ModelSpec

WEIGHTS_HELP = (
    "Provide the weights: start once with network access so they are downloaded into the cache "
    "(HF_HOME, default ~/.cache/huggingface), set HF_HUB_OFFLINE=1 to use only that cache, "
    "or set CLIP_MODEL=local-dir:/path to a folder holding open_clip_config.json and "
    "open_clip_model.safetensors"
)


def fetch_weights(spec: ModelSpec) -> None:
    """Download the weights into the cache (with a progress bar) without building the model.

    Run in the gunicorn master before workers fork, so a missing download stops start-up once,
    with a clear message, and workers find the weights cached.
    """
    # Imported for every model, local-dir: included: under gunicorn this runs in the master, and the
    # workers forked from it inherit torch and open_clip already imported instead of each spending
    # seconds on it (importing touches no CUDA).
    import open_clip

    try:
        if spec.pretrained is not None:
            cfg = open_clip.get_pretrained_cfg(spec.open_clip_name, spec.pretrained)
            open_clip.download_pretrained(cfg)
        elif spec.hf_repo is not None:
            open_clip.factory._get_hf_config(spec.hf_repo)
            open_clip.pretrained.download_pretrained_from_hf(spec.hf_repo)
    except Exception as error:  # every hub/network/cache failure means the same to the operator
        raise weights_error(f"Weights for CLIP_MODEL={spec.name}", error) from error


def weights_error(what: str, error: BaseException) -> ModelLoadError:
    """"<what> could not be loaded (<cause>). <how to provide the weights>"."""
    return ModelLoadError(f"{what} could not be loaded ({type(error).__name__}: {first_line(error)}). "
                          f"{WEIGHTS_HELP}")


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]
