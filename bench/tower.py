"""The bare towers: every engine and precision this machine runs, without HTTP, decoding or batching.

The image tower is timed through the engine the service uses (`encode_images` on prepared real
photos), in ms per image at batch 1 and batch 8, with the cosine of its features to torch fp32's. With
`--texts`, the text tower encodes the shipped vocabulary under the prompt ensemble (what a cold start
does) and reports labels x templates per second. bench/speed.py runs the image part in the same run as
the service, as the ceiling the service is measured against. Random weights: speed does not depend on
them.

    .venv/bin/python -m bench.tower [--arch ViT-B-32 | --model CLIP_MODEL] [--texts]   # from the root
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from clip_service.engines.registry import load_engine
from clip_service.engines.spec import parse_model_spec
from clip_service.settings import openvino_installed
from clip_service.vocabulary.features import ensemble_features
from clip_service.vocabulary.labels import load_labels, load_templates

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TowerFigures:
    """One engine and precision: the image tower's speed and agreement with torch fp32."""

    backend: str
    precision: str
    batch1_ms: float  # per image
    batch8_ms: float  # per image
    images_per_s: float  # at batch 8
    cosine_to_fp32: float  # least, over the photos
    label_encoding_s: float | None = None  # the whole vocabulary x templates, with --texts
    texts_per_s: float | None = None
    int8_activations: bool = False  # OpenVINO int8 with the image activations quantised too (VNNI/AMX)


def supported_engines(device: str = "cpu") -> list[tuple[str, str]]:
    """(CLIP_BACKEND, CLIP_PRECISION) pairs worth measuring on this machine."""
    if device != "cpu":  # CUDA keeps torch; fp16 is its default
        return [("torch", "fp32"), ("torch", "fp16")]
    engines = [("torch", "fp32"), ("torch", "bf16")]
    if openvino_installed():
        engines += [("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")]
    return engines


def photo_batch(engine, count: int = 8) -> torch.Tensor:
    """(count, 3, H, W) prepared pixels of real photos (scikit-image's), cycled to `count`."""
    import skimage.data
    from PIL import Image

    names = ("astronaut", "coffee", "chelsea", "rocket")
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in names]
    return torch.stack([engine.prepare(photos[i % len(photos)]) for i in range(count)])


def per_image_ms(engine, pixels: torch.Tensor, seconds: float) -> float:
    """ms per image of the fastest of the passes run back to back for `seconds` (at least 5), after two
    warm-up passes: the tower's own cost, which a busy neighbour can only make look worse."""
    engine.encode_images(pixels)
    engine.encode_images(pixels)
    fastest, passes, started = float("inf"), 0, time.perf_counter()
    while passes < 5 or time.perf_counter() - started < seconds:
        began = time.perf_counter()
        engine.encode_images(pixels)
        fastest = min(fastest, time.perf_counter() - began)
        passes += 1
    return fastest / len(pixels) * 1000


def measure(clip_model: str, cache_dir: Path, engines: list[tuple[str, str]], seconds: float = 3.0,
            texts: list[str] | None = None, templates: tuple[str, ...] = (), log=print,
            device: str = "cpu", before_timing=lambda: None) -> list[TowerFigures]:
    """Each engine in turn (one loaded at a time), against torch fp32's features on `device`.

    `before_timing()` runs before each engine is timed (bench/speed.py waits there for a quiet machine).
    """
    spec = parse_model_spec(clip_model)
    reference = None
    figures = []
    for backend, precision in engines:
        engine = load_engine(spec, device if backend == "torch" else "cpu", precision, backend, cache_dir)
        pixels = photo_batch(engine)
        features = engine.encode_images(pixels)
        if reference is None:
            reference = load_engine(spec, device, "fp32", "torch").encode_images(pixels)
        cosine = torch.nn.functional.cosine_similarity(features, reference, dim=-1).min().item()
        before_timing()
        batch1, batch8 = per_image_ms(engine, pixels[:1], seconds), per_image_ms(engine, pixels, seconds)
        activations = getattr(engine, "int8_activations", False)
        row = TowerFigures(backend, precision, round(batch1, 1), round(batch8, 1), round(1000 / batch8, 1),
                           round(cosine, 5), int8_activations=activations)
        if texts:
            started = time.perf_counter()
            ensemble_features(engine, tuple(texts), templates)
            row.label_encoding_s = round(time.perf_counter() - started, 1)
            row.texts_per_s = round(len(texts) * len(templates) / row.label_encoding_s)
        mode = " (activations too)" if activations else ""
        log(f"tower {backend} {precision}{mode}: {row.batch1_ms} / {row.batch8_ms} ms per image, "
            f"{row.images_per_s} images/s at batch 8, cosine {row.cosine_to_fp32}"
            + (f", labels {row.label_encoding_s} s" if texts else ""))
        figures.append(row)
        del engine
        gc.collect()
    return figures


def format_table(figures: list[TowerFigures]) -> str:
    texts = any(row.label_encoding_s is not None for row in figures)
    header = (f"{'engine':<10}{'precision':<10}{'batch 1 ms':>11}{'batch 8 ms':>11}{'images/s':>10}"
              f"{'cos fp32':>10}" + (f"{'labels s':>10}{'texts/s':>9}" if texts else ""))
    lines = [header, "-" * len(header)]
    for row in figures:
        lines.append(f"{row.backend:<10}{row.precision:<10}{row.batch1_ms:>11.1f}{row.batch8_ms:>11.1f}"
                     f"{row.images_per_s:>10.1f}{row.cosine_to_fp32:>10.5f}"
                     + (f"{row.label_encoding_s or 0:>10.1f}{row.texts_per_s or 0:>9}" if texts else ""))
    return "\n".join(lines)


def write_random_model(arch: str, folder: Path) -> str:
    """A full-size open_clip architecture with random weights in local-dir layout (tests' writer)."""
    import open_clip

    from tests.support.models import write_tiny_clip

    config = open_clip.get_model_config(arch)
    if config is None:
        raise SystemExit(f"--arch {arch}: not an open_clip architecture; see open_clip.list_models()")
    return f"local-dir:{write_tiny_clip(folder, model_cfg=config)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--arch", default="ViT-B-32", help="open_clip architecture, random weights")
    source.add_argument("--model", help="any CLIP_MODEL (needs its weights)")
    parser.add_argument("--engines", help="comma-separated BACKEND:PRECISION pairs, e.g. "
                        "torch:fp32,openvino:int8 (default: every one this machine runs)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per timing (default 3)")
    parser.add_argument("--texts", action="store_true",
                        help="also time encoding the shipped vocabulary under the prompt ensemble")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    engines = ([tuple(pair.split(":")) for pair in args.engines.split(",")] if args.engines
               else supported_engines())
    with tempfile.TemporaryDirectory(prefix="clip-tower-") as work:
        clip_model = args.model or write_random_model(args.arch, Path(work) / "model")
        texts = templates = None
        if args.texts:
            texts = list(load_labels(ROOT / "labels").texts)
            templates = load_templates(ROOT / "prompts" / "ensemble.txt", "")
        print(f"{args.model or args.arch + ' (random weights)'}, {torch.get_num_threads()} threads")
        figures = measure(clip_model, Path(work) / "cache", engines, args.seconds, texts, templates or (),
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(figures))
    print([asdict(row) for row in figures])
    ratio = int8_ratio(figures)
    if ratio:
        print(ratio)


def int8_ratio(figures: list[TowerFigures]) -> str | None:
    """OpenVINO int8's images/s over bf16's, measured in the same run (activations quantised too where
    the CPU has VNNI or AMX, weights only elsewhere)."""
    rows = {row.precision: row for row in figures if row.backend == "openvino"}
    if "int8" not in rows or "bf16" not in rows:
        return None
    mode = "weights + activations" if rows["int8"].int8_activations else "weights only"
    return (f"openvino int8 ({mode}) / bf16 images/s at batch 8: "
            f"{rows['int8'].images_per_s / rows['bf16'].images_per_s:.2f} x")


if __name__ == "__main__":
    main()
