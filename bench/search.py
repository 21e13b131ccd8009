"""Search benchmark: how fast the photo index answers, and what it costs per image.

    .venv/bin/python -m bench.search [--vectors 100000] [--dimensions 512] [--queries 200] [--no-server]
                                     [--keep FILE] [--expansions 64,128,256]

It writes an index of N clustered synthetic unit vectors (clustered_vectors; paths like
`2024/08/IMG_012345.jpg`) with the service's own writer, with its approximate (HNSW) index, then measures:
1. in process: `tasks.search.best_matches` (k=10) over the memory-mapped index, as the server runs it,
   exact and approximate: build time of the approximate index, its bytes per image, the process's peak
   memory while building, p50/p99 latency (one thread), and recall@10 of the approximate search against
   the exact one for queries near the data (a photo's vector with noise, as "more like this" asks) and
   for queries like a text's (a direction in the photos' subspace, as far from every photo as CLIP's gap
   between its two towers leaves a text: cosine about 0.3 to its nearest photo), and for queries far
   from all of it (random directions, nearly orthogonal to every photo: near-ties make the top-10
   hardest to find; no real query is like that, so it is the worst case, not the goal);
   `--expansions` repeats the approximate measurement at other search depths (HNSW's ef; the shipped
   one is library/approximate.py's EXPANSION_SEARCH);
2. over HTTP: `GET /search?q=...&k=10` on CLIP.sh with SEARCH_INDEX set, one client, each query a new
   text (so its embedding is computed), p50/p99 of the round trip and of the answer's processing_time.
   The server runs a model with tiny towers but ViT-B/32's 512-dimensional embeddings (random weights:
   speed does not depend on them), so the index is shaped as a real ViT-B/32 one;
   `--faiss` adds faiss's HNSW at the same settings (f16 vectors, M=16, efConstruction and efSearch as
   ours) for the same figures, the measurement usearch was picked by (`pip install faiss-cpu`, not a
   requirement);
`--keep FILE` keeps the written index (and its build figures beside it, FILE.json) and reuses it on the
next run with the same --vectors and --dimensions, so a 1,000,000-vector build (most of an hour on 2
cores) is paid once and the searches can be measured again on a quiet machine.
3. memory per image: the vectors (memory-mapped, shared by all workers through the page cache) and the
   paths and their lookup table (in each worker), measured with tracemalloc.
"""

from __future__ import annotations

import argparse
import json
import resource
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
from clip_service.tasks.search import Match, best_matches
from tests.support.models import TINY_CONFIG, write_tiny_clip

TARGET_MS = 50.0
WORDS = ("dog", "cat", "beach", "mountain", "red", "car", "birthday", "snow", "city", "night", "tree", "boat")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", "--images", dest="images", type=int, default=100_000,
                        help="vectors in the index (default 100000)")
    parser.add_argument("--dimensions", type=int, default=512, help="embedding size (default 512, ViT-B/32)")
    parser.add_argument("--queries", type=int, default=200, help="queries per measurement (default 200)")
    parser.add_argument("--no-server", action="store_true", help="only the in-process measurement")
    parser.add_argument("--faiss", action="store_true",
                        help="also measure faiss's HNSW at the same settings (needs faiss-cpu installed)")
    parser.add_argument("--keep", type=Path, help="keep the index here and reuse it when it matches")
    parser.add_argument("--expansions", default="",
                        help="comma-separated search depths (ef) to measure besides the shipped one")
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


def clustered_vectors(count: int, dimensions: int, seed: int = 0, latent: int = 64,
                      clusters: int = 1000) -> np.ndarray:
    """(count, dimensions) unit vectors shaped a little like photo embeddings: a mixture of `clusters`
    groups in a `latent`-dimensional subspace (photos of a library vary along far fewer directions than
    512) plus a little noise in every dimension. Uniform random vectors would be the worst case for any
    nearest-neighbour index (every point nearly equidistant), a case no photo library is."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((latent, dimensions), dtype=np.float32)
    centres = rng.standard_normal((clusters, latent), dtype=np.float32)
    vectors = np.empty((count, dimensions), dtype=np.float32)
    for first in range(0, count, 50_000):  # a block at a time: 1,000,000 x 512 needs no second copy
        rows = min(50_000, count - first)
        points = centres[rng.integers(0, clusters, rows)] + 0.5 * rng.standard_normal((rows, latent),
                                                                                      dtype=np.float32)
        block = points @ basis + 0.16 * rng.standard_normal((rows, dimensions), dtype=np.float32)
        vectors[first:first + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return vectors


def queries_near(vectors: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """Queries like "more photos like this one": stored vectors with noise, unit length."""
    rng = np.random.default_rng(seed)
    queries = vectors[rng.integers(0, len(vectors), count)] + 0.05 * rng.standard_normal(
        (count, vectors.shape[1]), dtype=np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def queries_text_like(vectors: np.ndarray, count: int, seed: int = 3, nearest: float = 0.3) -> np.ndarray:
    """Queries shaped as a text's embedding is against photos': a mix of a few stored vectors (a
    concept that several photos share), pushed away from all of them along a random direction until
    its cosine to the mix is `nearest`."""
    rng = np.random.default_rng(seed)
    mixes = vectors[rng.integers(0, len(vectors), (count, 4))].sum(axis=1)
    mixes /= np.linalg.norm(mixes, axis=1, keepdims=True)
    away = rng.standard_normal(mixes.shape, dtype=np.float32)
    away -= (away * mixes).sum(axis=1, keepdims=True) * mixes  # orthogonal to the mix
    away /= np.linalg.norm(away, axis=1, keepdims=True)
    queries = nearest * mixes + np.sqrt(1 - nearest ** 2) * away
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def queries_far(dimensions: int, count: int, seed: int = 2) -> np.ndarray:
    """Random unit directions: far from every stored vector."""
    queries = np.random.default_rng(seed).standard_normal((count, dimensions), dtype=np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def recall_at_10(exact: list[list[str]], approximate: list[list[str]]) -> float:
    """The share of the exact top-10 that the approximate search also returned."""
    found = sum(len(set(a) & set(b)) for a, b in zip(exact, approximate, strict=True))
    return found / sum(len(a) for a in exact)


def make_index(file: Path, folder: Path, clip_model: str, vectors: np.ndarray) -> dict:
    """Write the index without and then with its approximate index: the build's time (the difference)
    and the process's peak memory before and after it."""
    paths = [f"{2000 + n % 25}/{1 + n % 12:02d}/IMG_{n:06d}.jpg" for n in range(len(vectors))]
    identity = model_identity(parse_model_spec(clip_model))
    started = time.perf_counter()
    write_index(file, folder, clip_model, identity, paths, vectors, approximate=False)
    exact_seconds = time.perf_counter() - started
    exact_bytes = file.stat().st_size
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    write_index(file, folder, clip_model, identity, paths, vectors, approximate=True)
    built = time.perf_counter() - started - exact_seconds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"build_s": round(built, 1), "exact_write_s": round(exact_seconds, 1),
            "hnsw_bytes_per_image": round((file.stat().st_size - exact_bytes) / len(vectors)),
            "build_peak_rss_mb": round(peak / 1024), "peak_rss_before_build_mb": round(peak_before / 1024),
            "exact_file_bytes": exact_bytes}


def timed_searches(index, queries: np.ndarray, approximate) -> tuple[dict, list[list[Match]]]:
    times, found = [], []
    for query in queries:
        started = time.perf_counter()
        matches = best_matches(index.embeddings, index.paths, query, 10, approximate)
        times.append((time.perf_counter() - started) * 1000)
        found.append(matches)
    return percentiles(times), found


def compared(exact: list[list[Match]], approximate: list[list[Match]]) -> dict:
    """Recall@10, and what a miss costs: how much lower the approximate 10th best similarity is than
    the exact 10th, on average and at worst (0 when the same; near-ties make misses cheap)."""
    lost = [truth[-1].score - found[-1].score for truth, found in zip(exact, approximate, strict=True)]
    return {"recall_at_10": round(recall_at_10([[m.path for m in each] for each in exact],
                                               [[m.path for m in each] for each in approximate]), 4),
            "tenth_score_lost_mean": round(statistics.fmean(lost), 4),
            "tenth_score_lost_max": round(max(lost), 4)}


def faiss_hnsw(vectors: np.ndarray, queries: int) -> dict:
    """faiss's IndexHNSWSQ (f16 vectors, inner product on unit vectors = cosine) at our HNSW settings."""
    import faiss

    from clip_service.library.approximate import CONNECTIVITY, EXPANSION_ADD, EXPANSION_SEARCH

    dimensions = vectors.shape[1]
    index = faiss.IndexHNSWSQ(dimensions, faiss.ScalarQuantizer.QT_fp16, CONNECTIVITY,
                              faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EXPANSION_ADD
    started = time.perf_counter()
    index.train(vectors)
    index.add(vectors)
    built = time.perf_counter() - started
    index.hnsw.efSearch = EXPANSION_SEARCH
    size = len(faiss.serialize_index(index))
    result = {"build_s": round(built, 1), "bytes_per_image": round(size / len(vectors))}
    faiss.omp_set_num_threads(1)  # one query on one thread, as ours is measured
    for name, asked in (("near", queries_near(vectors, queries)), ("far", queries_far(dimensions, queries))):
        truth = [list(np.argpartition(-(vectors @ query), 9)[:10]) for query in asked]
        times, found = [], []
        for query in asked:
            started = time.perf_counter()
            _, rows = index.search(query[None], 10)
            times.append((time.perf_counter() - started) * 1000)
            found.append(list(rows[0]))
        result[name] = {**percentiles(times), "recall_at_10": round(recall_at_10(truth, found), 4)}
    return result


def kept_or_made(keep: Path | None, file: Path, folder: Path, clip_model: str, vectors: np.ndarray) -> dict:
    """The build figures of `keep` when it holds an index of these vectors, else those of a new one."""
    figures = keep.with_name(keep.name + ".json") if keep else None
    if keep and keep.exists() and figures.exists():
        built = json.loads(figures.read_text())
        if built.get("shape") == list(vectors.shape):
            log(f"reusing {keep} (built {built['build_s']} s)")
            return built
    built = make_index(file, folder, clip_model, vectors)
    if keep:
        keep.parent.mkdir(parents=True, exist_ok=True)
        file.replace(keep)
        figures.write_text(json.dumps({**built, "shape": list(vectors.shape), "code": git_state()}) + "\n")
    return built


def in_process(file: Path, vectors: np.ndarray, queries: int, expansions: list[int]) -> dict:
    tracemalloc.start()
    index = read_index(file)
    _ = index.row_of
    per_worker = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    float(index.embeddings.sum())  # pages in, as the server does at load
    asked = queries_near(vectors, queries)
    timed_searches(index, asked[:10], index.approximate)  # warm the graph's pages
    exact, exact_found = timed_searches(index, asked, None)
    approximate, approximate_found = timed_searches(index, asked, index.approximate)
    text = queries_text_like(vectors, queries)
    text_exact, text_exact_found = timed_searches(index, text, None)
    text_approximate, text_approximate_found = timed_searches(index, text, index.approximate)
    far = queries_far(index.dimensions, queries)
    far_exact, far_exact_found = timed_searches(index, far, None)
    far_approximate, far_approximate_found = timed_searches(index, far, index.approximate)
    depths = {}
    shipped = index.approximate.depth
    for depth in expansions:
        index.approximate.depth = depth
        row = {}
        for name, kind, truth in (("near", asked, exact_found), ("text", text, text_exact_found),
                                  ("far", far, far_exact_found)):
            times, found = timed_searches(index, kind, index.approximate)
            row[name] = {**times, **compared(truth, found)}
        depths[depth] = row
    index.approximate.depth = shipped
    count = len(index.paths)
    return {"exact": exact, "approximate": approximate, "text_exact": text_exact,
            "text_approximate": text_approximate, "far_exact": far_exact,
            "far_approximate": far_approximate, "shipped_depth": shipped, "depths": depths,
            "near_quality": compared(exact_found, approximate_found),
            "text_quality": compared(text_exact_found, text_approximate_found),
            "far_quality": compared(far_exact_found, far_approximate_found),
            "vector_bytes_per_image": index.dimensions * 4,
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
        vectors = clustered_vectors(args.images, args.dimensions)
        built = kept_or_made(args.keep, index, work / "images", clip_model, vectors)
        if args.keep:
            index = args.keep
        expansions = [int(depth) for depth in args.expansions.split(",") if depth.strip()]
        result = {"images": args.images, "dimensions": args.dimensions, "queries": args.queries,
                  "build": built, "in_process": in_process(index, vectors, args.queries, expansions),
                  "code": git_state()}
        if args.faiss:
            result["faiss"] = faiss_hnsw(vectors, args.queries)
        if not args.no_server:
            result["http"] = over_http(args, clip_model, index, work)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    local, built = result["in_process"], result["build"]
    print(f"index: {args.images} images x {args.dimensions} dimensions, {local['file_bytes'] / 1e6:.1f} MB "
          f"({built['exact_file_bytes'] / 1e6:.1f} MB without the approximate index)")
    print(f"memory per image: {local['vector_bytes_per_image']} B of vectors + "
          f"{built['hnsw_bytes_per_image']} B of approximate index (both memory-mapped, shared by the "
          f"workers) + {local['worker_bytes_per_image']} B of paths and lookup in each worker")
    print(f"build: exact {built['exact_write_s']} s (writing the vectors), approximate "
          f"+{built['build_s']} s; peak RSS {built['build_peak_rss_mb']} MB (before the build: "
          f"{built['peak_rss_before_build_mb']} MB)")
    for kind in ("exact", "approximate", "text_exact", "text_approximate", "far_exact", "far_approximate"):
        print(f"best_matches {kind.replace('_', ' queries ')}, k=10: p50 {local[kind]['p50_ms']} ms, "
              f"p99 {local[kind]['p99_ms']} ms (target < {TARGET_MS:g} ms)")
    for name in ("near", "text", "far"):
        quality = local[f"{name}_quality"]
        print(f"{name} queries, approximate (depth {local['shipped_depth']}) against exact: recall@10 "
              f"{quality['recall_at_10']}, 10th similarity lower by {quality['tenth_score_lost_mean']} on "
              f"average, {quality['tenth_score_lost_max']} at most")
    for depth, row in local["depths"].items():
        print(f"depth {depth}: " + "; ".join(
            f"{name} p50 {row[name]['p50_ms']} ms, p99 {row[name]['p99_ms']} ms, recall@10 "
            f"{row[name]['recall_at_10']} (10th lower by {row[name]['tenth_score_lost_mean']})"
            for name in ("near", "text", "far")))
    if "faiss" in result:
        theirs = result["faiss"]
        print(f"faiss HNSW (same settings): build {theirs['build_s']} s, {theirs['bytes_per_image']} B per "
              f"image (read into each process's memory); near queries p50 {theirs['near']['p50_ms']} ms, p99 "
              f"{theirs['near']['p99_ms']} ms, recall@10 {theirs['near']['recall_at_10']}; far queries p50 "
              f"{theirs['far']['p50_ms']} ms, p99 {theirs['far']['p99_ms']} ms, recall@10 "
              f"{theirs['far']['recall_at_10']}")
    if "http" in result:
        trip, inside = result["http"]["round_trip"], result["http"]["processing_time"]
        print(f"GET /search?q=...&k=10 on CLIP.sh: round trip p50 {trip['p50_ms']} ms, p99 {trip['p99_ms']} "
              f"ms; processing_time p50 {inside['p50_ms']} ms, p99 {inside['p99_ms']} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
