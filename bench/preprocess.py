"""Where the model input is made: Pillow on the request threads, or OpenVINO inside the compiled tower.

    .venv/bin/python -m bench.preprocess [--arch ViT-B-32 | --model CLIP_MODEL] [--seconds 3]

On JPEG photos of 640x480 and 1920x1080 (scikit-image's, q90), per image, on the OpenVINO engine the
service runs (CLIP_PRECISION=auto):

- the steps alone: Pillow's one-step resize and crop (engines/preprocess.py) against the same steps
  compiled by OpenVINO (openvino_preprocess.pixels_only) at batch 8 and batch 1, with their mean
  difference in grey levels; and the JPEG decode at the DCT scale the server uses (covering twice the
  model input) against the smallest scale that covers it, with the drift that smaller scale costs;
- the whole way, decoded image to features, at batch 8: Pillow then the tower, against the tower with
  the preprocessing inside, batched by size (8 of one size; and 8 of 4 sizes, two batches each of 2), and
  at batch 1 per image.

ms are core-independent wall times of the fastest of several passes (a busy neighbour only slows a pass).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.batch import model_in as written_model
from bench.speed import SIZES, make_images
from clip_service.engines.openvino_import import ov
from clip_service.engines.openvino_preprocess import pixels_only
from clip_service.engines.preprocess import model_input_pixels
from clip_service.engines.registry import load_engine
from clip_service.engines.spec import parse_model_spec
from clip_service.inputs.images import ImageLimits, decode_image

LIMITS = ImageLimits(max_bytes=1 << 26, max_pixels=1 << 26)
BATCH = 8


def fastest_ms(work, seconds: float, per: int = 1) -> float:
    """ms per item of the fastest pass of `work()` (which handles `per` items), after a warm-up."""
    work()
    best, passes, started = float("inf"), 0, time.perf_counter()
    while passes < 5 or time.perf_counter() - started < seconds:
        began = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - began)
        passes += 1
    return best / per * 1000


def decoded(data: bytes, side: int | None) -> Image.Image:
    """The JPEG decoded at the smallest DCT scale covering side x side (the server's decode_image
    covers twice the model input), RGB."""
    image = Image.open(io.BytesIO(data))
    if side:
        image.draft("RGB", (side, side))
    return image.convert("RGB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="any CLIP_MODEL (needs its weights)")
    source.add_argument("--arch", default="ViT-B-32", help="open_clip architecture, full size with random "
                        "weights (default ViT-B-32), or 'tiny' for the test model")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per timing (default 3)")
    parser.add_argument("--work", type=Path, help="keep the model and its OpenVINO export here")
    args = parser.parse_args(argv)
    args.arch = None if args.arch == "tiny" else args.arch
    with tempfile.TemporaryDirectory(prefix="clip-preprocess-bench-") as folder:
        work = args.work.resolve() if args.work else Path(folder)
        work.mkdir(parents=True, exist_ok=True)
        clip_model, described = written_model(args, work)
        engine = load_engine(parse_model_spec(clip_model), "cpu", "auto", "openvino", work / "cache")
        tower = engine.preprocessing_tower()
        geometry, side = engine.geometry, max(engine.input_size)
        steps = ov.Core().compile_model(pixels_only(geometry), "CPU", {"INFERENCE_NUM_THREADS": 1})
        steps_request = steps.create_infer_request()
        print(f"model: {described}; engine openvino {engine.precision}; input {engine.input_size}")
        paths = make_images(work / "images", tuple(SIZES)[:2])
        header = (f"{'size':<10}{'decode 2x':>10}{'decode 1x':>10}{'drift 1x':>9}{'Pillow':>8}"
                  f"{'OV b8':>7}{'OV b1':>7}{'diff':>6}   {'Pillow+tower':>12}{'OV b8':>7}"
                  f"{'OV mixed':>9}{'OV b1':>7}")
        print("steps alone, ms per image (1 thread)                        |  decoded image -> features, "
              "ms per image")
        print(header)
        print("-" * len(header))
        for size, files in paths.items():
            jpegs = [path.read_bytes() for path in files]
            data = [jpegs[index % len(jpegs)] for index in range(BATCH)]
            decode_2x = fastest_ms(lambda data=data: [decode_image(one, LIMITS, engine.input_size)
                                                      for one in data], args.seconds, BATCH)
            decode_1x = fastest_ms(lambda data=data: [decoded(one, side) for one in data], args.seconds,
                                   BATCH)
            images = [decode_image(one, LIMITS, engine.input_size) for one in data]
            small = [decoded(one, side) for one in data]
            drift = np.mean([np.abs(model_input_pixels(a, geometry, None).astype(np.float32)
                                    - model_input_pixels(b, geometry, None)).mean()
                             for a, b in zip(images, small, strict=True)])
            arrays = [np.asarray(image) for image in images]
            batch = np.stack(arrays)
            pillow = fastest_ms(lambda images=images: [model_input_pixels(image, geometry, None)
                                                       for image in images], args.seconds, BATCH)
            graph_8 = fastest_ms(lambda batch=batch: steps_request.infer([batch]), args.seconds, BATCH)
            graph_1 = fastest_ms(lambda arrays=arrays: [steps_request.infer([one[None]]) for one in arrays],
                                 args.seconds, BATCH)
            made = steps_request.infer([batch])[0].transpose(0, 2, 3, 1).astype(np.float32)
            difference = np.mean([np.abs(made[index] - model_input_pixels(image, geometry, None)).mean()
                                  for index, image in enumerate(images)])
            whole_pillow = fastest_ms(lambda images=images: engine.encode_images(
                torch.stack([engine.prepare(image) for image in images])), args.seconds, BATCH)
            whole_8 = fastest_ms(lambda arrays=arrays: tower.encode(arrays), args.seconds, BATCH)
            whole_1 = fastest_ms(lambda arrays=arrays: tower.encode(arrays, per_image=True), args.seconds,
                                 BATCH)
            # 8 images of 4 sizes: the crops of this size's photos, two of each, batched by size
            mixed = [np.ascontiguousarray(arrays[index][:arrays[index].shape[0] - 8 * (index // 2)])
                     for index in range(BATCH)]
            whole_mixed = fastest_ms(lambda mixed=mixed: tower.encode(mixed), args.seconds, BATCH)
            print(f"{size:<10}{decode_2x:>10.2f}{decode_1x:>10.2f}{drift:>9.2f}{pillow:>8.2f}"
                  f"{graph_8:>7.2f}{graph_1:>7.2f}{difference:>6.2f}   {whole_pillow:>12.1f}{whole_8:>7.1f}"
                  f"{whole_mixed:>9.1f}{whole_1:>7.1f}")
        print("decode 2x: the server's DCT scale (covering twice the input); 1x: the smallest covering it; "
              "drift 1x: mean grey levels the 1x decode moves the model input by; diff: OpenVINO's steps "
              "against Pillow's, grey levels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
