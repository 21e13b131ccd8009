"""Batch benchmark: 16 images in one POST /analyze/batch against 16 sequential POST /analyze requests,
one client, on the service exactly as CLIP.sh starts it.

    .venv/bin/python -m bench.batch [--arch ViT-B-32 | --model CLIP_MODEL] [--images 16] [--rounds 5]

Both ways send the same 640x480 JPEG photos (scikit-image's astronaut, chelsea, coffee, in turn) from one
thread with one keep-alive connection, and both answers are checked (16 successes with predictions).
Rounds alternate between the two ways, after a warm-up of each; the figure is images/s over all timed
rounds, and the ratio batch / sequential. Default model: full-size ViT-B/32 with random weights (speed
does not depend on the weights); --arch tiny measures the plumbing on the test model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import requests
from urllib3.filepost import encode_multipart_formdata

from bench.speed import (
    ROOT,
    OtherCpu,
    git_state,
    log,
    make_images,
    prepare_model,
    service_server,
    start,
    wait_for_quiet,
)

SIZE = "640x480"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="any CLIP_MODEL, passed through unchanged (needs its weights)")
    source.add_argument("--arch", default="ViT-B-32", help="an open_clip architecture written full size "
                        "with random weights (default ViT-B-32), or 'tiny' for the test model")
    parser.add_argument("--images", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each way (default 5)")
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra setting for the service (repeatable)")
    parser.add_argument("--work", type=Path, help="keep the model, images and label cache in this folder, "
                        "so a second run starts in seconds instead of encoding every label again")
    parser.add_argument("--max-other-cpu", type=float, metavar="PCT",
                        help="for a shared machine: start each round once other processes use at most PCT %% "
                        "of the CPU (waiting up to 2 minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "batch-results.json")
    args = parser.parse_args(argv)
    args.extra_env = dict(item.split("=", 1) for item in args.service_env)
    if args.arch == "tiny":
        args.arch = None
    return args


def checked(response: requests.Response, results: int | None = None) -> None:
    body = response.json()
    if response.status_code != 200 or body.get("status") != "success":
        raise RuntimeError(f"not a success answer: {response.status_code} {response.text[:300]}")
    if results is not None and [item["status"] for item in body["results"]] != ["success"] * results:
        raise RuntimeError(f"a file of the batch failed: {response.text[:300]}")


def bodies(photos: list[bytes]) -> tuple[list[tuple[bytes, str]], tuple[bytes, str]]:
    """The multipart bodies, encoded once before timing: one per photo, and one with all of them."""
    alone = [encode_multipart_formdata({"file": ("photo.jpg", data, "image/jpeg")}) for data in photos]
    together = encode_multipart_formdata(
        [("file", (f"{index}.jpg", data, "image/jpeg")) for index, data in enumerate(photos)])
    return alone, together


def sequential(session: requests.Session, base: str, alone: list[tuple[bytes, str]]) -> float:
    started = time.perf_counter()
    for body, content_type in alone:
        checked(session.post(f"{base}/analyze", data=body, headers={"Content-Type": content_type},
                             timeout=300))
    return time.perf_counter() - started


def batched(session: requests.Session, base: str, together: tuple[bytes, str], count: int) -> float:
    started = time.perf_counter()
    body, content_type = together
    checked(session.post(f"{base}/analyze/batch", data=body, headers={"Content-Type": content_type},
                         timeout=300), count)
    return time.perf_counter() - started


def model_in(args: argparse.Namespace, work: Path) -> tuple[str, str]:
    """The benchmark's model, written once into work/model (a kept --work folder reuses it)."""
    folder = work / "model"
    if args.work and (folder / "open_clip_model.safetensors").exists() and not args.model:
        return f"local-dir:{folder}", f"{args.arch or 'tiny test model'}, random weights (kept in --work)"
    return prepare_model(args, folder)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clip-batch-bench-") as folder:
        work = args.work.resolve() if args.work else Path(folder)
        work.mkdir(parents=True, exist_ok=True)
        clip_model, described = model_in(args, work)
        paths = make_images(work / "images", (SIZE,))[SIZE]
        alone, together = bodies([paths[index % len(paths)].read_bytes() for index in range(args.images)])
        server = service_server(args, clip_model, work, "service")
        running = []
        try:
            start(server, running, 1800)
            seconds = {"sequential": [], "batch": []}
            with requests.Session() as session:
                sequential(session, server.base, alone)  # warm-up: first passes, allocator, caches
                batched(session, server.base, together, args.images)
                other = OtherCpu(running)
                for round_number in range(args.rounds):
                    if args.max_other_cpu is not None:
                        wait_for_quiet(running, args.max_other_cpu)
                    seconds["sequential"].append(sequential(session, server.base, alone))
                    seconds["batch"].append(batched(session, server.base, together, args.images))
                    log(f"round {round_number + 1}: sequential {seconds['sequential'][-1]:.2f} s, "
                        f"batch {seconds['batch'][-1]:.2f} s")
                disturbed = other.percent()
        finally:
            for process in running:
                process.stop()
    rates = {way: args.images * len(times) / sum(times) for way, times in seconds.items()}
    best = {way: args.images / min(times) for way, times in seconds.items()}
    result = {
        "model": described, "images": args.images, "size": SIZE, "rounds": args.rounds,
        "images_per_s": {way: round(rate, 2) for way, rate in rates.items()},
        "median_seconds": {way: round(statistics.median(times), 3) for way, times in seconds.items()},
        "ratio": round(rates["batch"] / rates["sequential"], 2),
        "best_round_images_per_s": {way: round(rate, 2) for way, rate in best.items()},
        "best_round_ratio": round(best["batch"] / best["sequential"], 2),
        "other_cpu_percent": disturbed, "code": git_state(),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"model: {described}; {args.images} images of {SIZE}, {args.rounds} rounds each, one client")
    print(f"{args.images} sequential /analyze: {rates['sequential']:.2f} images/s "
          f"(median {result['median_seconds']['sequential']:.2f} s a round)")
    print(f"one /analyze/batch of {args.images}: {rates['batch']:.2f} images/s "
          f"(median {result['median_seconds']['batch']:.2f} s a round)")
    print(f"batch / sequential: {result['ratio']:.2f}x over all rounds, {result['best_round_ratio']:.2f}x "
          f"best round against best round  (other processes used {disturbed} % of the CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
