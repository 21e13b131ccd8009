"""The serving path against its own ceiling: the service as CLIP.sh starts it, and the bare image tower
of the very engine it runs, measured in the same run, side by side.

    .venv/bin/python -m bench.ratio --arch ViT-B-32 [--seconds 8] [--max-other-cpu 10] [--work DIR]

The service starts first (its Ready line says which engine CLIP_BACKEND=auto picked); the bare tower of
that engine and precision (bench/tower.py: `encode_images` on prepared photos, the fastest of several
passes at batch 8) is timed while the service is idle, before and after the load, and the better of
the two readings is the ceiling. After an untimed warm-up load on each size (`--warm-up`), the load:
640x480 and 1920x1080 JPEG uploads at concurrency 16 (closed loop, bench/load.py), and one client
sending /analyze/batch of 16 640x480 photos back to back. It ends
with the three ratios on lines of their own:

    640x480 c16: R x bare tower
    1920x1080 c16: R x bare tower
    /analyze/batch of 16: R x bare tower

The targets of issue 19 are 0.85, 0.75 and 0.85. On a shared machine, --max-other-cpu waits for quiet
before each measurement and re-measures a disturbed cell (bench/speed.py's rule); the `other%` column
says how much CPU the rest of the machine took meanwhile.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.batch import batched, bodies
from bench.batch import model_in as written_model
from bench.load import run_closed_loop
from bench.speed import (
    ROOT,
    OtherCpu,
    git_state,
    log,
    make_images,
    make_send,
    measure_quietly,
    ready_engine,
    service_server,
    start,
    wait_for_quiet,
)
from bench.tower import measure as measure_towers

CELLS = (("640x480", 0.85), ("1920x1080", 0.75))
BATCH_TARGET = 0.85
CONCURRENCY = 16
BATCH_IMAGES = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="any CLIP_MODEL, passed through unchanged (needs its weights)")
    source.add_argument("--arch", default="ViT-B-32", help="an open_clip architecture written full size "
                        "with random weights (default ViT-B-32), or 'tiny' for the test model")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per load cell (default 8)")
    parser.add_argument("--warm-up", type=float, default=10.0,
                        help="seconds of untimed load at c16 on each size before anything is timed "
                        "(default 10): the first cell after start-up measured 5-10 %% slow without it")
    parser.add_argument("--batch-rounds", type=int, default=10,
                        help="timed /analyze/batch requests (default 10)")
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra setting for the service (repeatable), e.g. CLIP_PRECISION=int8")
    parser.add_argument("--max-other-cpu", type=float, metavar="PCT",
                        help="for a shared machine: measure once other processes use at most PCT %% "
                        "of the CPU (waiting up to 2 minutes each time)")
    parser.add_argument("--work", type=Path, help="keep the model, images and caches in this folder, so "
                        "a second run neither converts the model nor encodes the labels again")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "ratio-results.json")
    args = parser.parse_args(argv)
    args.extra_env = dict(item.split("=", 1) for item in args.service_env)
    if args.arch == "tiny":
        args.arch = None
    return args


def tower_images_per_s(args, clip_model: str, cache: Path, engine: tuple[str, str]) -> float:
    """The bare tower of `engine` (backend, precision) at batch 8, images/s, after a quiet moment."""
    def quiet() -> None:
        if args.max_other_cpu is not None:
            wait_for_quiet([], args.max_other_cpu)
    row = measure_towers(clip_model, cache, [engine], seconds=4.0, log=log, before_timing=quiet)[0]
    return row.images_per_s


def batch_images_per_s(args, base: str, paths: list[Path], running: list) -> dict:
    """One client, /analyze/batch of BATCH_IMAGES photos back to back: images/s over the timed rounds."""
    _, together = bodies([paths[index % len(paths)].read_bytes() for index in range(BATCH_IMAGES)])
    with requests.Session() as session:
        batched(session, base, together, BATCH_IMAGES)  # warm-up
        if args.max_other_cpu is not None:
            wait_for_quiet(running, args.max_other_cpu)
        other = OtherCpu(running)
        times = [batched(session, base, together, BATCH_IMAGES) for _ in range(args.batch_rounds)]
    return {"images_per_s": round(BATCH_IMAGES * len(times) / sum(times), 2),
            "best_round_images_per_s": round(BATCH_IMAGES / min(times), 2),
            "other_cpu_percent": other.percent()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "code": git_state(),
                     "service_env": args.extra_env}
    with tempfile.TemporaryDirectory(prefix="clip-ratio-bench-") as folder:
        work = args.work.resolve() if args.work else Path(folder)
        work.mkdir(parents=True, exist_ok=True)
        clip_model, results["model"] = written_model(args, work)
        images = make_images(work / "images", tuple(size for size, _ in CELLS))
        server = service_server(args, clip_model, work, "service")
        running = []
        try:
            start(server, running, 1800)
            described = ready_engine(server)  # "openvino fp32"
            results["engine"] = described
            engine = tuple(described.split(" ", 1))
            for size, _ in CELLS:  # steady state first: the service's first loaded seconds run slow
                run_closed_loop(make_send(server, "upload", images[size]), CONCURRENCY, seconds=args.warm_up)
            # the service's own export: the tower reads it, converting nothing
            towers = [tower_images_per_s(args, clip_model, work / "cache", engine)]
            cells = results.setdefault("cells", {})
            for size, _ in CELLS:
                cells[size] = measure_quietly(args, server, "upload", images[size], CONCURRENCY, running)
                log(f"{size} c{CONCURRENCY}: {cells[size]['requests_per_s']} req/s")
            results["batch"] = batch_images_per_s(args, server.base, images["640x480"], running)
            log(f"/analyze/batch of {BATCH_IMAGES}: {results['batch']['images_per_s']} images/s")
            towers.append(tower_images_per_s(args, clip_model, work / "cache", engine))
        finally:
            for process in running:
                process.stop()
    results["tower_images_per_s"] = towers
    ceiling = max(towers)
    lines = [f"model: {results['model']}; the service ran {described}; bare tower at batch 8: "
             f"{' and '.join(f'{reading:.1f}' for reading in towers)} images/s (before and after the "
             f"load; the ratios use the higher, {ceiling:.1f})",
             f"{'load':<24}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'other%':>8}"]
    for size, _ in CELLS:
        cell = cells[size]
        lines.append(f"{size + ' uploads c16':<24}{cell['requests_per_s']:>10.1f}{cell['p50_ms']:>9.1f}"
                     f"{cell['p99_ms']:>9.1f}{cell['errors']:>8}{cell['other_cpu_percent']:>8.1f}")
    batch = results["batch"]
    lines.append(f"{'/analyze/batch of 16':<24}{batch['images_per_s']:>10.1f}{'':>9}{'':>9}{'':>8}"
                 f"{batch['other_cpu_percent']:>8.1f}")
    ratios = {f"{size} c{CONCURRENCY}": (cells[size]["requests_per_s"] / ceiling, target)
              for size, target in CELLS}
    ratios[f"/analyze/batch of {BATCH_IMAGES}"] = (batch["images_per_s"] / ceiling, BATCH_TARGET)
    results["ratios"] = {name: round(value, 3) for name, (value, _) in ratios.items()}
    print("\n".join(lines))
    best_batch = batch["best_round_images_per_s"] / ceiling
    results["batch_best_round_ratio"] = round(best_batch, 3)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for name, (value, target) in ratios.items():
        # the batch's fastest round beside it: the ceiling is the tower's fastest pass
        best = f"; fastest round {best_batch:.2f}" if name.startswith("/analyze/batch") else ""
        print(f"{name}: {value:.2f} x bare tower  (target {target}{best})")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
