"""Where the service's CPU goes under load: the worker's threads, and py-spy's samples of its Python work.

Starts the service as CLIP.sh does (same settings as bench/speed.py), sends a closed-loop upload load,
and meanwhile reads every thread's CPU time from /proc and records the worker with py-spy (installed
with requirements-dev.txt). It prints requests/s, the machine's CPU split between the worker's
inference, its request threads, the gunicorn master, the load generator and everything else, and the
request threads' CPU split by what they were doing (reading the request, decoding, preparing,
waiting for the GIL, scoring, JSON...).

    .venv/bin/python -m bench.serving_profile [--arch ViT-B-32] [--concurrency 16] [--seconds 20]
        [--size 640x480] [--service-env KEY=VALUE ...] [--raw FILE]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.load import check_answer, run_closed_loop
from bench.speed import SIZES, Server, _process_group, make_images, make_send, prepare_model
from tests.support.http_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
# What a request thread's sample was doing, by the first matching frame from the innermost outwards:
# (category, a piece of the frame's "function (file)" text).
CATEGORIES = (
    ("waiting for the model (batcher)", "batching.py"),
    ("preparing (resize, crop)", "prepare ("),
    ("decoding the image", "inputs/images.py"),
    ("scoring and predictions", "tasks/classify.py"),
    ("JSON answer", "json"),
    ("reading and parsing the request", "werkzeug/formparser"),
    ("reading and parsing the request", "werkzeug/sansio/multipart"),
    ("reading and parsing the request", "front_door.py"),
    ("request logging and metrics", "http/logs.py"),
    ("request logging and metrics", "prometheus_client"),
    ("Flask and werkzeug routing", "flask/"),
    ("Flask and werkzeug routing", "werkzeug/"),
    ("gunicorn", "gunicorn/"),
)


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (thread name, CPU seconds) for every thread of `pid`."""
    ticks = os.sysconf("SC_CLK_TCK")
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        threads[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / ticks)
    return threads


def python_threads(pid: int) -> dict[int, str]:
    """tid -> Python thread name, from `py-spy dump` (native threads are not listed)."""
    out = subprocess.run([py_spy(), "dump", "--pid", str(pid)], capture_output=True, text=True,
                         timeout=60).stdout
    names = {}
    for line in out.splitlines():
        # Thread 0x7F... (active+gil): "clip-batcher"  or  Thread 1234 (idle): "MainThread"
        if line.startswith("Thread "):
            head = line.split()[1]
            name = line.rsplit('"', 2)[-2] if line.count('"') >= 2 else "?"
            names[int(head, 16) if head.startswith("0x") else int(head)] = name
    return names


def batch_counts(server: Server) -> tuple[float, float]:
    """(images, forward passes) so far, from the service's clip_batch_size histogram."""
    import requests

    text = requests.get(f"{server.base}/metrics", timeout=10).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("clip_batch_size_sum", "clip_batch_size_count"))}
    return values.get("clip_batch_size_sum", 0.0), values.get("clip_batch_size_count", 0.0)


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install -r requirements-dev.txt")
    return found


# Innermost frames of a thread that waits: py-spy counts some of those samples as active
WAITS = ("Condition.wait (", "Event.wait (", "_worker (concurrent/futures/thread.py", "Queue.get (")


def categorise(stack: str) -> str:
    frames = stack.split(";")
    if frames[-1].startswith(WAITS):
        return "waiting (for work, or for the model)"
    for frame in reversed(frames):
        for category, needle in CATEGORIES:
            if needle in frame:
                return category
    return "other Python"


def request_breakdown(raw: Path, request_tids: set[int]) -> collections.Counter:
    """py-spy's raw (collapsed) on-CPU samples of the request threads, counted by category."""
    counts: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        head = stack.split(";", 1)[0]  # with --threads: "thread (<tid>): <name>"
        if not head.startswith("thread (") or int(head[8:head.index(")")]) not in request_tids:
            continue
        counts[categorise(stack)] += int(count)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", help="open_clip architecture, full size with random weights "
                        "(default: the tiny test model)")
    parser.add_argument("--model")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--size", default="640x480", choices=list(SIZES))
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    parser.add_argument("--cache-dir", type=Path, help="CLIP_CACHE_DIR to keep between runs (default: a "
                        "fresh one, so the model is converted and the labels encoded at start)")
    args = parser.parse_args()
    args.quick = False
    with tempfile.TemporaryDirectory(prefix="clip-profile-") as tmp:
        work = Path(tmp)
        clip_model, note = prepare_model(args, work / "model")
        images = make_images(work / "images", (args.size,))[args.size]
        env = {"PORT": str(free_port()), "PRIVATE": "True", "CLIP_MODEL": clip_model,
               "CLIP_CACHE_DIR": str(args.cache_dir or work / "cache"),
               "API_HOST": "127.0.0.1", "API_PORT": str(free_port()), "API_TIMEOUT": "0.2",
               **dict(item.split("=", 1) for item in args.service_env)}
        server = Server("service", [str(ROOT / "CLIP.sh")], env, int(env["PORT"]), work / "service.log")
        server.start()
        try:
            seconds, health = server.wait_healthy(1800)
            settings = args.service_env or "CLIP.sh defaults"
            print(f"{note}; healthy after {seconds:.1f} s; {args.size} uploads at concurrency "
                  f"{args.concurrency} for {args.seconds:g} s; settings {settings}")
            report(args, server, images, work)
        finally:
            server.stop()
            if args.raw and (work / "raw.txt").exists():
                shutil.copy(work / "raw.txt", args.raw)


def report(args, server: Server, images: list[Path], work: Path) -> None:
    send = make_send(server, "upload", images)
    check_answer(send)
    run_closed_loop(send, args.concurrency, total=max(20, 2 * args.concurrency))  # warm-up
    master = server.process.pid
    workers = [pid for pid in _process_group(master) if pid != master]
    worker = workers[0]
    names = python_threads(worker)
    batches_before = batch_counts(server)
    before = {pid: thread_cpu(pid) for pid in (master, worker)}
    own_before, busy_before = os.times(), _machine_busy()
    record = subprocess.Popen([py_spy(), "record", "--pid", str(worker), "--format", "raw", "--threads",
                               "--rate", "200", "--duration", str(int(args.seconds)),
                               "--output", str(work / "raw.txt"), "--nonblocking"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result_box = {}
    loader = threading.Thread(target=lambda: result_box.update(
        result=run_closed_loop(send, args.concurrency, seconds=args.seconds)))
    started = time.perf_counter()
    loader.start()
    loader.join()
    wall = time.perf_counter() - started
    after = {pid: thread_cpu(pid) for pid in (master, worker)}
    own_after, busy_after = os.times(), _machine_busy()
    record.wait(timeout=120)
    summary = result_box["result"].summary()
    images, batches = (after - before for after, before in zip(batch_counts(server), batches_before,
                                                               strict=True))
    print(f"\n{summary['requests_per_s']} req/s, p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, "
          f"errors {summary['errors']}; {batches:g} forward passes, {images / max(batches, 1):.2f} images "
          "per pass on average")
    cores = os.cpu_count() or 1
    capacity = wall * cores
    worker_threads = {tid: after[worker][tid][1] - before[worker].get(tid, ("", 0.0))[1]
                      for tid in after[worker]}
    batcher = {tid for tid, name in names.items() if name == "clip-batcher"}
    request_tids = {tid for tid, name in names.items() if name.startswith(("ThreadPoolExecutor", "Thread-"))}
    python_tids = set(names)
    parts = collections.OrderedDict()
    parts["inference: the batcher thread and the runtime's own threads"] = sum(
        cpu for tid, cpu in worker_threads.items() if tid in batcher or tid not in python_tids)
    parts["request threads (HTTP, decode, prepare, scoring, JSON)"] = sum(
        worker_threads.get(tid, 0.0) for tid in request_tids)
    parts["the worker's other Python threads (event loop, canary, ...)"] = sum(
        cpu for tid, cpu in worker_threads.items()
        if tid in python_tids and tid not in batcher and tid not in request_tids)
    parts["gunicorn master"] = sum(cpu - before[master].get(tid, ("", 0.0))[1]
                                   for tid, (_, cpu) in after[master].items())
    parts["load generator (this process)"] = (own_after.user + own_after.system
                                              - own_before.user - own_before.system)
    parts["everything else on the machine"] = max(0.0, (busy_after - busy_before) - sum(parts.values()))
    parts["idle"] = max(0.0, capacity - (busy_after - busy_before))
    requests_done = summary["requests"] or 1
    print(f"\nCPU over {wall:.1f} s x {cores} cores ({capacity:.1f} core-seconds):")
    for name, seconds in parts.items():
        print(f"  {name:<62} {seconds:6.1f} s  {seconds / capacity * 100:5.1f} %  "
              f"{seconds / requests_done * 1000:6.2f} ms/request")
    counts = request_breakdown(work / "raw.txt", request_tids) if (work / "raw.txt").exists() else {}
    waiting = counts.pop("waiting (for work, or for the model)", 0)
    total = sum(counts.values())
    if total:
        request_cpu = parts["request threads (HTTP, decode, prepare, scoring, JSON)"]
        print(f"\nRequest threads' CPU by what they were doing (py-spy samples; {waiting} more samples "
              "were waits):")
        for category, count in counts.most_common():
            share = count / total
            print(f"  {category:<40} {share * 100:5.1f} %  {share * request_cpu / requests_done * 1000:6.2f} "
                  "ms/request")


def _machine_busy() -> float:
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
