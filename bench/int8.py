"""Real int8 (image activations quantised) against bf16 and fp32: issue 19's three targets in one run.

1. Speed: the bare image tower of a full-size architecture with random weights, OpenVINO bf16, int8
   weights only and int8 with activations, images/s at batch 8, timed in turns in the same run (fastest
   pass, as bench/tower.py). Random weights time like real ones.
2. Cosine to torch fp32 on real photos the calibration never saw (scikit-image's astronaut, coffee,
   chelsea, rocket and matplotlib's grace_hopper), on the colour-trained tiny CLIP and on the random
   full-size one. Random weights make activation ranges unlike a trained model's (no outlier channels),
   so their cosine says little about a real model's; the trained model's is the one that counts.
3. The colour-trained model's answers (its top label among the 8 colours, under the service's prompt
   ensemble) on its evaluation pictures (100 unseen pictures per colour), int8 against torch fp32.

Both int8 modes are measured whatever this CPU has (the service quantises activations only where it has
VNNI or AMX); the CPU's flags are printed. Ends with one line per target.

    nice .venv/bin/python -m bench.int8 [--arch ViT-B-32] [--seconds 3] [--skip-speed]
    .venv/bin/python -m bench.int8 --write-calibration   # rewrite engines/calibration/ from the wheels
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.tower import TowerFigures, format_table, photo_batch, write_random_model
from clip_service.engines import openvino_quantize
from clip_service.engines.openvino_import import ov
from clip_service.engines.registry import load_engine
from clip_service.engines.spec import parse_model_spec
from clip_service.vocabulary.features import ensemble_features
from clip_service.vocabulary.labels import load_templates

ROOT = Path(__file__).resolve().parent.parent
# Held out of the calibration set: the photos every accuracy figure is measured on.
EVALUATION_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
# The shipped calibration photos: scikit-image's, none of them an evaluation photo; each public domain
# or CC0 as its skimage.data docstring says (engines/calibration/README.md).
CALIBRATION_PHOTOS = ("camera", "clock", "coins", "brick", "grass", "gravel", "text",
                      "hubble_deep_field", "immunohistochemistry", "retina")
CALIBRATION_SHORT_SIDE = 256
TARGETS = {"speed": 1.5, "cosine": 0.99, "answers": 0.99}
PER_COLOUR = 100


def write_calibration(folder: Path = openvino_quantize.CALIBRATION_DIR) -> list[Path]:
    """The calibration photos from scikit-image's wheel, shortest side CALIBRATION_SHORT_SIDE, as JPEG."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in CALIBRATION_PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)())
        photo = photo.convert("L" if photo.mode in ("L", "I", "1", "I;16") else "RGB")
        scale = CALIBRATION_SHORT_SIDE / min(photo.size)
        if scale < 1:
            photo = photo.resize((round(photo.width * scale), round(photo.height * scale)),
                                 Image.Resampling.LANCZOS)
        path = folder / f"{name}.jpg"
        photo.save(path, "JPEG", quality=90, optimize=True)
        written.append(path)
    return written


def evaluation_photos() -> dict:
    import matplotlib.cbook
    import skimage.data
    from PIL import Image

    photos = {name: Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
              for name in EVALUATION_PHOTOS}
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        photos["grace_hopper"] = Image.open(handle).convert("RGB")
    return photos


@contextlib.contextmanager
def int8_mode(activations: bool):
    """CLIP_PRECISION=int8 as a CPU with (or without) VNNI/AMX would run it."""
    real = openvino_quantize.cpu_runs_int8_activations
    openvino_quantize.cpu_runs_int8_activations = lambda core: activations
    try:
        yield
    finally:
        openvino_quantize.cpu_runs_int8_activations = real


def load(spec, backend: str, precision: str, cache: Path, activations: bool = False):
    with int8_mode(activations):
        return load_engine(spec, "cpu", precision, backend, cache)


def least_cosine(engine, reference, photos) -> float:
    pixels = torch.stack([engine.prepare(photo) for photo in photos.values()])
    features, expected = engine.encode_images(pixels), reference.encode_images(pixels)
    return torch.nn.functional.cosine_similarity(features, expected, dim=-1).min().item()


def colour_answers(engine, pictures, templates) -> torch.Tensor:
    """(N,) index of the top colour for each picture."""
    from tests.support.trained_clip import COLOURS

    texts = ensemble_features(engine, tuple(COLOURS), templates)  # (8, D)
    answers = []
    for start in range(0, len(pictures), 32):
        pixels = torch.stack([engine.prepare(picture) for _, _, picture in pictures[start:start + 32]])
        answers.append((engine.encode_images(pixels) @ texts.T).argmax(dim=-1))
    return torch.cat(answers)


def trained_model_figures(cache: Path, log) -> dict:
    """Cosine on real photos and answers on the evaluation pictures, colour-trained model."""
    from tests.support.trained_clip import COLOURS, trained_model, unseen_pictures

    spec = parse_model_spec(f"local-dir:{trained_model(cache / 'trained')}")
    photos = evaluation_photos()
    pictures = unseen_pictures(COLOURS, PER_COLOUR)
    truth = torch.tensor([list(COLOURS).index(colour) for colour, _, _ in pictures])
    templates = load_templates(ROOT / "prompts" / "ensemble.txt", "")
    reference = load(spec, "torch", "fp32", cache)
    expected = colour_answers(reference, pictures, templates)
    right = (expected == truth).float().mean().item()
    rows = {"torch fp32": {"cosine": 1.0, "unchanged": 1.0, "right": right}}
    for label, backend, precision, activations in (("openvino fp32", "openvino", "fp32", False),
                                                    ("openvino bf16", "openvino", "bf16", False),
                                                    ("openvino int8 weights", "openvino", "int8", False),
                                                    ("openvino int8 w+act", "openvino", "int8", True)):
        engine = load(spec, backend, precision, cache / "ov", activations)
        answers = colour_answers(engine, pictures, templates)
        rows[label] = {"cosine": least_cosine(engine, reference, photos),
                       "unchanged": (answers == expected).float().mean().item(),
                       "right": (answers == truth).float().mean().item()}
        log(f"trained {label}: {rows[label]}")
    return rows


def format_trained(rows: dict) -> str:
    header = f"{'colour-trained CLIP':<24}{'cos fp32 photos':>16}{'answers = fp32':>16}{'right':>8}"
    lines = [header, "-" * len(header)]
    for label, row in rows.items():
        lines.append(f"{label:<24}{row['cosine']:>16.5f}{row['unchanged'] * 100:>15.2f}%"
                     f"{row['right'] * 100:>7.1f}%")
    return "\n".join(lines)


def speed_figures(arch: str, work: Path, seconds: float, log) -> list[TowerFigures]:
    """OpenVINO bf16, int8 weights and int8 weights + activations on one full-size random model, timed
    in turns (a pass of each, again and again) so a neighbour's load falls on all three alike; the
    fastest pass of each counts, as bench/tower.py's."""
    spec = parse_model_spec(write_random_model(arch, work / "model"))
    engines = {"bf16": load(spec, "openvino", "bf16", work / "cache"),
               "int8 w": load(spec, "openvino", "int8", work / "cache", activations=False),
               "int8 w+a": load(spec, "openvino", "int8", work / "cache", activations=True)}
    pixels = photo_batch(engines["bf16"])  # (8, 3, H, W) uint8: scikit-image's photos
    reference = load(spec, "torch", "fp32", work).encode_images(pixels)
    fastest = {(name, batch): float("inf") for name in engines for batch in (1, 8)}
    core_ms = dict.fromkeys(engines, float("inf"))  # least process CPU time per image at batch 8
    for engine in engines.values():  # warm-up
        engine.encode_images(pixels)
        engine.encode_images(pixels[:1])
    started, rounds = time.perf_counter(), 0
    while rounds < 5 or time.perf_counter() - started < seconds * len(fastest):
        for (name, batch), best in fastest.items():
            began, began_cpu = time.perf_counter(), time.process_time()
            engines[name].encode_images(pixels[:batch])
            fastest[name, batch] = min(best, (time.perf_counter() - began) / batch * 1000)
            if batch == 8:
                core_ms[name] = min(core_ms[name], (time.process_time() - began_cpu) / batch * 1000)
        rounds += 1
    log(f"{rounds} rounds of each engine in turn; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs at the end")
    # CPU time is what a busy neighbour changes least (it lengthens wall time, not work)
    print("core-ms per image at batch 8 (least CPU time of this process over a pass): "
        + ", ".join(f"{name} {value:.1f}" for name, value in core_ms.items())
        + f"; int8 w+a {core_ms['bf16'] / core_ms['int8 w+a']:.2f} x fewer than bf16")
    figures = []
    for name, engine in engines.items():
        cosine = torch.nn.functional.cosine_similarity(engine.encode_images(pixels), reference, dim=-1)
        figures.append(TowerFigures("openvino", name, round(fastest[name, 1], 1), round(fastest[name, 8], 1),
                                    round(1000 / fastest[name, 8], 1), round(cosine.min().item(), 5)))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture for speed, random weights")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per timing (default 3)")
    parser.add_argument("--skip-speed", action="store_true", help="accuracy only (minutes less)")
    parser.add_argument("--skip-accuracy", action="store_true", help="speed only")
    parser.add_argument("--write-calibration", action="store_true",
                        help=f"write the calibration photos into {openvino_quantize.CALIBRATION_DIR}")
    args = parser.parse_args()
    if args.write_calibration:
        for path in write_calibration():
            print(path, path.stat().st_size)
        return
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("nncf").setLevel(logging.WARNING)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    flags = sorted(openvino_quantize.cpu_flags() & (openvino_quantize.INT8_INSTRUCTIONS | {"avx512_bf16",
                                                                                          "amx_bf16"}))
    core = ov.Core()
    print(f"CPU {core.get_property('CPU', 'FULL_DEVICE_NAME')}, OpenVINO "
          f"{core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}, int8/bf16 flags {flags or 'none'}; "
          f"the service quantises activations here: {openvino_quantize.cpu_runs_int8_activations(core)}; "
          f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="clip-int8-") as work:
        work = Path(work)
        trained = {} if args.skip_accuracy else trained_model_figures(work, log)
        if trained:
            print(format_trained(trained))
        speed = [] if args.skip_speed else speed_figures(args.arch, work / "speed", args.seconds, log)
    if speed:
        print(f"\n{args.arch} (random weights), image tower")
        print(format_table(speed))
    int8 = trained.get("openvino int8 w+act")
    if speed:
        rates = {row.precision: row.images_per_s for row in speed}
        ratio = rates["int8 w+a"] / rates["bf16"]
        print(f"speed: int8 w+a {rates['int8 w+a']} images/s = {ratio:.2f} x bf16 {rates['bf16']} "
              f"(int8 weights only {rates['int8 w'] / rates['bf16']:.2f} x; target {TARGETS['speed']} x): "
              f"{'met' if ratio >= TARGETS['speed'] else 'NOT met'}")
        print(f"cosine to fp32, random {args.arch}, real photos: {speed[-1].cosine_to_fp32:.5f} "
              "(random weights: ranges unlike a trained model's)")
    if int8 is None:
        return
    print(f"cosine to fp32, colour-trained, real photos: {int8['cosine']:.5f} (target {TARGETS['cosine']}): "
          f"{'met' if int8['cosine'] >= TARGETS['cosine'] else 'NOT met'}")
    print(f"colour-trained answers unchanged: {int8['unchanged'] * 100:.2f} % of {PER_COLOUR * 8} pictures "
          f"(target {TARGETS['answers'] * 100:.0f} %): "
          f"{'met' if int8['unchanged'] >= TARGETS['answers'] else 'NOT met'}")


if __name__ == "__main__":
    main()
