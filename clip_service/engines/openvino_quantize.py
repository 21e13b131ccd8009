"""Real int8 for the image tower: activations quantised too, by NNCF's post-training quantisation.

Weights-only int8 (openvino_export.compress_weights_int8) leaves activations in float, so the matrix
products run at float speed. Quantised activations let OpenVINO's CPU plugin run every fully connected
layer and both attention products as u8 x i8 products, which VNNI (AVX512-VNNI, AVX-VNNI) and AMX
execute at several times the float rate. A CPU without them runs the same graph with no gain over float
(bench/RESULTS.md), so there CLIP_PRECISION=int8 keeps the weights-only export.

NNCF needs activation ranges, measured on pictures: the photos in engines/calibration/ (public domain or
CC0, from scikit-image's wheel; see its README) ship with the service, and are cropped, flipped,
colour-jittered and resized with a fixed seed into CALIBRATION_SIZE model inputs when the model is
converted, offline. The quantised tower is kept in the conversion cache like any export; its key has
RECIPE, the photos' bytes and NNCF's version, so a change to any of them quantises again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from clip_service.engines.base import ModelLoadError
from clip_service.engines.openvino_import import ov

log = logging.getLogger(__name__)

INT8_ACTIVATIONS = "int8-static"  # the export's weights format: int8 weights and int8 activations
CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration"
CALIBRATION_SIZE = 128  # model inputs; 64 answered the same, 300 no better (bench/RESULTS.md)
CALIBRATION_SEED = 0
# What NNCF is asked for, part of the export key. NNCF's transformer defaults (SmoothQuant, which moves
# activation outliers into the weights, and fast bias correction), but each activation's range is its
# least and greatest value seen, not the mean over pictures of each one's extremes: the averaged ranges
# clipped what a picture unlike the calibration set brings, and changed 2.4 % of the colour-trained
# model's answers (none with the full ranges).
RECIPE = f"nncf.quantize transformer cpu minmax-activations {CALIBRATION_SIZE} seed {CALIBRATION_SEED}"
# /proc/cpuinfo's names for the instructions that run u8 x i8 products natively
INT8_INSTRUCTIONS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's instruction flags as Linux lists them; empty where there is no /proc/cpuinfo."""
    try:
        with cpuinfo.open() as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_runs_int8_activations(core: ov.Core) -> bool:
    """VNNI or AMX under OpenVINO's INT8 capability: OpenVINO lists INT8 on every x86 CPU it runs on
    (AVX2 included), so the instructions that make int8 faster are read from the CPU's flags."""
    return ("INT8" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            and bool(cpu_flags() & INT8_INSTRUCTIONS))


def recipe_key() -> str:
    """Changes when the quantised tower could: the recipe, the shipped photos, NNCF's version."""
    digest = hashlib.sha256(RECIPE.encode())
    digest.update(_nncf_version().encode())
    for path in calibration_photo_paths():
        digest.update(path.name.encode() + b"\x00" + path.read_bytes())
    return digest.hexdigest()


def _nncf_version() -> str:
    try:
        return importlib.metadata.version("nncf")
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def calibration_photo_paths() -> list[Path]:
    return sorted(CALIBRATION_DIR.glob("*.jpg"))


def calibration_inputs(height: int, width: int, count: int = CALIBRATION_SIZE,
                       seed: int = CALIBRATION_SEED) -> list[np.ndarray]:
    """`count` model inputs, each (1, 3, height, width) uint8, from the shipped photos.

    Each is a random crop (a third to all of a photo's area, aspect ratio 3:4 to 4:3), flipped half the
    time, with brightness, contrast and saturation jittered, and grey photos tinted half the time (most
    shipped photos are grey), then resized to cover the input and cropped to its centre, as a photo
    sent to the service is.
    """
    paths = calibration_photo_paths()
    if not paths:
        raise FileNotFoundError(f"no calibration photos (*.jpg) in {CALIBRATION_DIR}: int8 needs them; "
                                "restore the folder from the repository, or use CLIP_PRECISION=bf16 or fp32")
    photos = [Image.open(path).convert("RGB") for path in paths]
    rng = np.random.default_rng(seed)
    inputs = []
    for n in range(count):
        photo = photos[n % len(photos)]
        picture = _random_crop(photo, rng)
        if rng.random() < 0.5:
            picture = ImageOps.mirror(picture)
        if _is_grey(photo) and rng.random() < 0.5:
            tint = tuple(int(v) for v in rng.integers(40, 256, 3))
            picture = ImageOps.colorize(picture.convert("L"), black=(0, 0, 0), white=tint)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            picture = enhance(picture).enhance(float(rng.uniform(0.7, 1.3)))
        inputs.append(_model_input(picture, height, width))
    return inputs


def _random_crop(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    area = photo.width * photo.height * rng.uniform(1 / 3, 1.0)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    width = min(photo.width, max(1, round((area * aspect) ** 0.5)))
    height = min(photo.height, max(1, round((area / aspect) ** 0.5)))
    left = int(rng.integers(0, photo.width - width + 1))
    top = int(rng.integers(0, photo.height - height + 1))
    return photo.crop((left, top, left + width, top + height))


def _is_grey(photo: Image.Image) -> bool:
    pixels = np.asarray(photo, dtype=np.int16)  # (H, W, 3)
    return bool(np.abs(pixels - pixels[..., :1]).max() <= 8)


def _model_input(picture: Image.Image, height: int, width: int) -> np.ndarray:
    """Resized (bicubic) to cover height x width and centre-cropped: (1, 3, height, width) uint8."""
    scale = max(width / picture.width, height / picture.height)
    size = (max(width, round(picture.width * scale)), max(height, round(picture.height * scale)))
    picture = picture.resize(size, Image.Resampling.BICUBIC)
    left, top = (picture.width - width) // 2, (picture.height - height) // 2
    pixels = np.asarray(picture.crop((left, top, left + width, top + height)))  # (H, W, 3)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


def quantize_image_tower(model: ov.Model, height: int, width: int) -> ov.Model:
    """The image tower (uint8 (N, 3, height, width) pixels in) with int8 weights and activations."""
    try:
        import nncf  # seconds to import, and only a conversion needs it
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    except ImportError as error:
        raise ModelLoadError(f"CLIP_PRECISION=int8 quantises activations with NNCF on this CPU, and it "
                             f"cannot be imported ({error}); install requirements.txt, or use "
                             "CLIP_PRECISION=bf16 or fp32") from error

    inputs = calibration_inputs(height, width)
    log.info("Quantising the image tower's activations to int8 on %d calibration pictures (NNCF %s)",
             len(inputs), nncf.__version__)
    advanced = nncf.AdvancedQuantizationParameters(
        activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    return nncf.quantize(model, nncf.Dataset(inputs), model_type=nncf.ModelType.TRANSFORMER,
                         target_device=nncf.TargetDevice.CPU, subset_size=len(inputs),
                         fast_bias_correction=True, advanced_parameters=advanced)
