"""Search benchmark: how fast the photo index answers, and what it costs per image.

    .venv/bin/python -m bench.search [--images 100000] [--dimensions 512] [--queries 200] [--no-server]

It writes an index of N random unit vectors (paths like `2024/08/IMG_012345.jpg`) with the service's own
writer, then measures:
1. in process: `tasks.search.best_matches` (k=10) over the memory-mapped index, as the server runs it;
2. over HTTP: `GET /search?q=...&k=10` on CLIP.sh with SEARCH_INDEX set, one client, each query a new
   text (so its embedding is computed), p50/p99 of the round trip and of the answer's processing_time.
   The server runs a model with tiny towers but ViT-B/32's 512-dimensional embeddings (random weights:
   speed does not depend on them), so the index is shaped as a real ViT-B/32 one;
3. memory per image: the vectors (memory-mapped, shared by all workers through the page cache) and the
   paths and their lookup table (in each worker), measured with tracemalloc.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import requests

from bench.speed import ROOT, git_state, log, service_server, start
from clip_service.engines.spec import model_identity, parse_model_spec
from clip_service.library.photo_index import read_index, write_index
from clip_service.tasks.search import best_matches
from tests.support.models import TINY_CONFIG, write_tiny_clip

TARGET_MS = 50.0
WORDS = ("dog", "cat", "beach", "mountain", "red", "car", "birthday", "snow", "city", "night", "tree", "boat")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000, help="vectors in the index (default 100000)")
    parser.add_argument("--dimensions", type=int, default=512, help="embedding size (default 512, ViT-B/32)")
    parser.add_argument("--queries", type=int, default=200, help="queries per measurement (default 200)")
    parser.add_argument("--no-server", action="store_true", help="only the in-process measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "search-results.json")
    args = parser.parse_args(argv)
    args.extra_env, args.max_other_cpu = {}, None
    return args


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
            "mean_ms": round(statistics.fmean(ordered), 2)}


def make_model(folder: Path, dimensions: int) -> str:
    config = dict(TINY_CONFIG, embed_dim=dimensions)
    write_tiny_clip(folder, model_cfg=config)
    return f"local-dir:{folder}"


def make_index(file: Path, folder: Path, clip_model: str, images: int, dimensions: int) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((images, dimensions), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    paths = [f"{2000 + n % 25}/{1 + n % 12:02d}/IMG_{n:06d}.jpg" for n in range(images)]
    write_index(file, folder, clip_model, model_identity(parse_model_spec(clip_model)), paths, vectors)


def in_process(file: Path, queries: int) -> dict:
    tracemalloc.start()
    index = read_index(file)
    _ = index.row_of
    per_worker = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    rng = np.random.default_rng(1)
    float(index.embeddings.sum())  # pages in, as the server does at load
    times = []
    for _ in range(queries):
        query = rng.standard_normal(index.dimensions).astype(np.float32)
        query /= np.linalg.norm(query)
        started = time.perf_counter()
        best_matches(index.embeddings, index.paths, query, 10)
        times.append((time.perf_counter() - started) * 1000)
    count = len(index.paths)
    return {**percentiles(times), "vector_bytes_per_image": index.dimensions * 4,
            "worker_bytes_per_image": round(per_worker / count), "file_bytes": file.stat().st_size}


def over_http(args, clip_model: str, index: Path, work: Path) -> dict:
    args.extra_env = {"SEARCH_INDEX": str(index)}
    server = service_server(args, clip_model, work, "service")
    running = []
    try:
        start(server, running, 600)
        round_trips, processing = [], []
        with requests.Session() as session:
            for number in range(args.queries + 5):
                first, second = WORDS[number % len(WORDS)], WORDS[(number * 7 + 3) % len(WORDS)]
                words = f"a {first} and a {second} {number}"  # a new text each time
                started = time.perf_counter()
                answer = session.get(f"{server.base}/search", params={"q": words, "k": 10}, timeout=60)
                elapsed = (time.perf_counter() - started) * 1000
                body = answer.json()
                if answer.status_code != 200 or len(body["matches"]) != 10:
                    raise RuntimeError(f"not a search answer: {answer.status_code} {answer.text[:300]}")
                if number >= 5:  # the first few warm the server up
                    round_trips.append(elapsed)
                    processing.append(body["metadata"]["processing_time"] * 1000)
    finally:
        for process in running:
            process.stop()
    return {"round_trip": percentiles(round_trips), "processing_time": percentiles(processing)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clip-search-bench-") as folder:
        work = Path(folder)
        (work / "images").mkdir()
        clip_model = make_model(work / "model", args.dimensions)
        index = work / "photos.clipindex"
        log(f"writing an index of {args.images} x {args.dimensions}")
        make_index(index, work / "images", clip_model, args.images, args.dimensions)
        result = {"images": args.images, "dimensions": args.dimensions, "queries": args.queries,
                  "in_process": in_process(index, args.queries), "code": git_state()}
        if not args.no_server:
            result["http"] = over_http(args, clip_model, index, work)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    local = result["in_process"]
    print(f"index: {args.images} images x {args.dimensions} dimensions, {local['file_bytes'] / 1e6:.1f} MB")
    print(f"memory per image: {local['vector_bytes_per_image']} B of vectors (memory-mapped, shared by the "
          f"workers) + {local['worker_bytes_per_image']} B of paths and lookup in each worker")
    print(f"best_matches, k=10: p50 {local['p50_ms']} ms, p99 {local['p99_ms']} ms "
          f"(target < {TARGET_MS:g} ms)")
    if "http" in result:
        trip, inside = result["http"]["round_trip"], result["http"]["processing_time"]
        print(f"GET /search?q=...&k=10 on CLIP.sh: round trip p50 {trip['p50_ms']} ms, p99 {trip['p99_ms']} "
              f"ms; processing_time p50 {inside['p50_ms']} ms, p99 {inside['p99_ms']} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
