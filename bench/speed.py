"""Speed benchmark: the service exactly as CLIP.sh starts it, against the seed's naive server
(bench/reference_server.py), same model, same labels, same images, same closed-loop load.

    .venv/bin/python -m bench.speed [--arch ViT-B-32 | --model CLIP_MODEL] [--quick] [--out FILE]

It reports requests/s and p50/p99 latency per input, image size and concurrency (with the ratio
service/reference), first, cold and warm start-up, and the service's resident memory under steady
load; and, as the ceiling, the bare image tower of every engine and precision the machine runs,
measured in the same run, with the service on each of them as a fraction of it. See bench/README.md.
Run it from the repository root: the servers are started, waited for and stopped by the tests' own
helpers (tests/support/server.py), in the same clean environment.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps

from bench.load import Send, check_answer, file_request, run_closed_loop, upload_request
from bench.tower import format_table as format_tower_table
from bench.tower import measure as measure_towers
from bench.tower import supported_engines
from tests.support import server as processes
from tests.support.http_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"640x480": (640, 480), "1920x1080": (1920, 1080), "4032x3024": (4032, 3024)}
QUICK_SIZES = ("640x480", "1920x1080")
PHOTOS = ("astronaut", "chelsea", "coffee")
INPUTS = ("upload", "file")
NOTE_WORDS = ("WARNING", "ERROR", "CRITICAL", "Traceback", "Loading", "Encoding", "Loaded", "Ready",
              "Convert")
ENGINE_CONCURRENCIES = (1, 16)  # per engine: 640x480 uploads, beside the matrix
JPEG_QUALITY = 90


def log(message: str) -> None:
    """Progress on stderr: a full run takes minutes, and stdout is kept for the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="any CLIP_MODEL, passed through unchanged (needs its weights)")
    source.add_argument("--arch", help="an open_clip architecture (e.g. ViT-B-32) written full size "
                        "with random weights; speed does not depend on the weights")
    parser.add_argument("--quick", action="store_true",
                        help="~2 s per cell, concurrency 1 and 16, sizes 640x480 and 1920x1080, "
                        "memory at requests 100 and 400")
    parser.add_argument("--seconds", type=float, help="seconds per cell (default 8, --quick 2)")
    parser.add_argument("--memory-requests", help="the two requests at which RSS is read, e.g. "
                        "500,2000 (default; --quick 100,400); 0 skips the memory run")
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra setting for the service (repeatable), e.g. WORKERS=2")
    parser.add_argument("--max-other-cpu", type=float, metavar="PCT",
                        help="for a shared machine: start each cell once other processes use at most "
                        "PCT %% of the CPU (waiting up to 2 minutes), re-measure a cell they disturbed "
                        "more (at most twice more) and keep the least disturbed try")
    parser.add_argument("--start-timeout", type=float, default=1800,
                        help="seconds a server may take to become healthy (default 1800)")
    parser.add_argument("--logs", type=Path, help="keep the work folder (server logs, model, images, "
                        "cache) here instead of a temporary folder")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json",
                        help="where the JSON goes (default bench/results.json)")
    parser.add_argument("--concurrency", help="comma-separated client counts, e.g. 1,16,64 "
                        "(default 1,4,16; --quick 1,16)")
    parser.add_argument("--engines", help="comma-separated CLIP_BACKEND:CLIP_PRECISION pairs for the bare "
                        "tower and the per-engine cells, e.g. torch:fp32,openvino:int8 (default: every "
                        "engine and precision this machine runs; 'none' skips them)")
    parser.add_argument("--sizes", dest="size_list", help="comma-separated image sizes from "
                        f"{', '.join(SIZES)} (default all; --quick 640x480,1920x1080)")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 8.0)
    args.concurrencies = (1, 16) if args.quick else (1, 4, 16)
    if args.concurrency:
        try:
            args.concurrencies = tuple(int(item) for item in args.concurrency.split(","))
        except ValueError:
            parser.error(f"--concurrency {args.concurrency}: give comma-separated integers, e.g. 1,16,64")
    args.sizes = QUICK_SIZES if args.quick else tuple(SIZES)
    if args.size_list:
        args.sizes = tuple(args.size_list.split(","))
        unknown = [size for size in args.sizes if size not in SIZES]
        if unknown:
            parser.error(f"--sizes: {unknown[0]} is not one of {', '.join(SIZES)}")
    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"  # where the service's default runs
    if args.engines == "none":
        args.engine_list = []
    elif args.engines:
        args.engine_list = [tuple(pair.split(":", 1)) for pair in args.engines.split(",")]
    else:
        args.engine_list = supported_engines(args.device)
    args.memory_at = _memory_checkpoints(args.memory_requests or ("100,400" if args.quick else "500,2000"))
    args.extra_env = dict(_key_value(item, parser) for item in args.service_env)
    args.logs = args.logs.resolve() if args.logs else None  # the servers run in the project folder
    return args


def _memory_checkpoints(raw: str) -> tuple[int, int] | None:
    if raw.strip() == "0":
        return None
    try:
        first, second = (int(part) for part in raw.split(","))
    except ValueError:
        first = second = 0
    if not 0 < first < second:
        raise SystemExit(f"--memory-requests {raw}: needs two counts, the first smaller, e.g. 500,2000")
    return first, second


def _key_value(item: str, parser: argparse.ArgumentParser) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        parser.error(f"--service-env {item}: expected KEY=VALUE")
    return key, value


def prepare_model(args: argparse.Namespace, folder: Path) -> tuple[str, str]:
    """The CLIP_MODEL both servers get, and a description of it for the results."""
    if args.model:
        return args.model, f"{args.model} (passed through)"
    import open_clip

    from tests.support.models import write_tiny_clip

    if args.arch:
        config = open_clip.get_model_config(args.arch)
        if config is None:
            raise SystemExit(f"--arch {args.arch}: not an open_clip architecture; see "
                             "open_clip.list_models()")
        if config.get("custom_text") or "multimodal_cfg" in config:
            raise SystemExit(f"--arch {args.arch}: only plain CLIP architectures (ViT-*, RN*, convnext_*) "
                             "can be written with random weights here; SigLIP, CoCa and other custom "
                             "text towers need --model with real weights")
        write_tiny_clip(folder, model_cfg=config)
        return f"local-dir:{folder}", f"{args.arch}, full size, random weights"
    write_tiny_clip(folder)
    return f"local-dir:{folder}", "tests/support/models.py tiny model (random weights)"


def make_images(folder: Path, sizes: tuple[str, ...]) -> dict[str, list[Path]]:
    """Real photos (skimage's astronaut, chelsea, coffee), cropped to each size's aspect, JPEG q90."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photos = {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS}
    images = {}
    for size in sizes:
        images[size] = []
        for name, photo in photos.items():
            path = folder / f"{name}-{size}.jpg"
            ImageOps.fit(photo, SIZES[size], Image.Resampling.LANCZOS).save(path, quality=JPEG_QUALITY)
            images[size].append(path)
    return images


def git_state() -> dict:
    """Which code was measured: others edit the service while benchmarks run."""
    def git(*words: str) -> str:
        return subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True).stdout
    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()  # "XY path"
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(changed),
            "uncommitted_changes": [line[3:] for line in changed]}


# -------------------------------------------------------------------------------------------- servers


class Server:
    """A server in its own process group, so stopping it also stops every worker it forked.

    Started, waited for and stopped by tests/support/server.py, as the tests start theirs: in the
    caller's environment without any service setting (nothing from the shell changes what is
    measured), plus `env`: what the benchmark sets and --service-env adds.
    """

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, log_path: Path):
        self.name, self.command, self.env, self.port, self.log_path = name, command, env, port, log_path
        self.process: subprocess.Popen | None = None
        self.started = 0.0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.started = time.perf_counter()
        self.process = processes.start(self.env, self.log_path, self.command, cwd=ROOT)

    def wait_healthy(self, timeout: float) -> tuple[float, dict]:
        """Seconds from process start to the first /health 200, and that answer."""
        try:
            health = processes.wait_healthy(self.port, self.process,
                                            timeout - (time.perf_counter() - self.started), self.log_path)
        except AssertionError as error:
            raise RuntimeError(f"{self.name}: {error}") from None
        return time.perf_counter() - self.started, health

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            processes.stop(self.process)
        except AssertionError as error:  # it was killed; the other servers must still be stopped
            log(f"{self.name}: {error}")

    def rss_bytes(self) -> dict[int, int]:
        """VmRSS of every live process in the group (gunicorn master and workers), by pid."""
        return {pid: _vm_rss(pid) for pid in _process_group(self.process.pid)}

    def pss_bytes(self) -> int:
        """Proportional set size of the group: shared pages split between their sharers, so unlike
        the RSS sum it is what the group really costs (the workers share the master's pages)."""
        return sum(_smaps_field(pid, "Pss:") for pid in _process_group(self.process.pid))

    def log_tail(self, lines: int = 30) -> str:
        return processes.log_tail(self.log_path, lines)


def _process_group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid:  # after "pid (comm)": state, ppid, pgrp
            pids.append(int(entry.name))
    return pids


def _vm_rss(pid: int) -> int:
    return _proc_field(Path(f"/proc/{pid}/status"), "VmRSS:")


def _smaps_field(pid: int, name: str) -> int:
    return _proc_field(Path(f"/proc/{pid}/smaps_rollup"), name)


def _proc_field(path: Path, name: str) -> int:
    """A `Name: <n> kB` line of a /proc file, in bytes; 0 when the process is gone."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_seconds_of_group(pgid: int) -> float:
    """utime + stime of every process in the group (all their threads, dead ones included)."""
    ticks = 0
    for pid in _process_group(pgid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (steal included: a neighbour VM took it from us)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherCpu:
    """How much CPU something other than the benchmark used during a cell.

    The machine may be shared (tests, builds, other sessions); a cell measured while a neighbour
    burned a core is not comparable, and this makes that visible instead of silently wrong.
    """

    def __init__(self, servers: list[Server]):
        self.servers = servers
        self.busy, self.ours, self.started = self._read()

    def _read(self) -> tuple[float, float, float]:
        times = os.times()
        ours = times.user + times.system + sum(
            _cpu_seconds_of_group(server.process.pid) for server in self.servers)
        return _machine_busy_seconds(), ours, time.perf_counter()

    def percent(self) -> float:
        """Other processes' CPU time since construction, as a percentage of all cores' capacity."""
        busy, ours, now = self._read()
        capacity = (now - self.started) * (os.cpu_count() or 1)
        return round(max(0.0, (busy - self.busy) - (ours - self.ours)) / capacity * 100, 1)


def service_server(args, clip_model: str, work: Path, name: str) -> Server:
    """The service as CLIP.sh starts it; only the settings the benchmark needs are set."""
    env = {
        "PORT": str(free_port()), "PRIVATE": "True", "CLIP_MODEL": clip_model,
        "CLIP_CACHE_DIR": str(work / "cache"), "ALLOWED_FILE_ROOTS": str(work / "images"),
        "API_HOST": "127.0.0.1", "API_PORT": str(free_port()), "API_TIMEOUT": "0.2",  # a closed port
        **args.extra_env,
    }
    return Server(name, [str(processes.CLIP_SH)], env, int(env["PORT"]), work / f"{name}.log")


def reference_server(clip_model: str, work: Path) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "bench.reference_server", "--port", str(port),
               "--model", clip_model, "--labels-dir", str(ROOT / "labels")]
    return Server("reference", command, {}, port, work / "reference.log")


def start(server: Server, running: list[Server], timeout: float) -> dict:
    running.append(server)
    server.start()
    seconds, health = server.wait_healthy(timeout)
    log(f"{server.name}: healthy after {seconds:.1f} s ({health.get('device')}, "
        f"{health.get('num_labels')} labels)")
    return {"seconds": round(seconds, 2), "health": health}


# ----------------------------------------------------------------------------------------------- load


def rotate(sends: list[Send]) -> Send:
    """Each request takes the next photo, so no server can profit from one image being repeated."""
    counter = itertools.count()
    return lambda session: sends[next(counter) % len(sends)](session)


def make_send(server: Server, kind: str, paths: list[Path]) -> Send:
    url = f"{server.base}/analyze"
    if kind == "upload":
        return rotate([upload_request(url, path.read_bytes(), path.name) for path in paths])
    return rotate([file_request(url, str(path)) for path in paths])


def measure_cell(server: Server, kind: str, paths: list[Path], concurrency: int, seconds: float,
                 everyone: list[Server]) -> dict:
    """Warm up (a checked answer, then a few requests at this concurrency), then a timed run."""
    send = make_send(server, kind, paths)
    check_answer(send)
    return timed_cell(send, concurrency, seconds, everyone)


def timed_cell(send: Send, concurrency: int, seconds: float, everyone: list[Server]) -> dict:
    """A few warm-up requests at this concurrency, then a timed run, with the CPU others used."""
    run_closed_loop(send, concurrency, total=max(3, concurrency))
    other = OtherCpu(everyone)
    summary = run_closed_loop(send, concurrency, seconds=seconds).summary()
    summary["other_cpu_percent"] = other.percent()
    return summary


def wait_for_quiet(everyone: list[Server], limit: float, patience: float = 120) -> float:
    """Wait (at most `patience` s) for a second in which other processes use at most `limit` % CPU.

    Returns the last reading. The servers are idle here, so anything busy is a neighbour.
    """
    deadline = time.perf_counter() + patience
    while True:
        other = OtherCpu(everyone)
        time.sleep(1)
        reading = other.percent()
        if reading <= limit or time.perf_counter() >= deadline:
            return reading


def measure_quietly(args, server: Server, kind: str, paths: list[Path], concurrency: int,
                    everyone: list[Server]) -> dict:
    """measure_cell on a quiet machine (--max-other-cpu): wait for quiet, retry a disturbed run at
    most twice, keep the least disturbed try. Without the option, one plain try."""
    return quietly(args.max_other_cpu, server.name, everyone,
                   lambda: measure_cell(server, kind, paths, concurrency, args.seconds, everyone))


def quietly(max_other_cpu: float | None, name: str, everyone: list[Server],
            measure: Callable[[], dict]) -> dict:
    """`measure()` (a cell's summary with other_cpu_percent) on a quiet machine: wait for quiet, retry a
    disturbed run at most twice, keep the least disturbed try. Without a limit, one plain try."""
    if max_other_cpu is None:
        return {**measure(), "tries": 1}
    tries = []
    for _ in range(3):
        quiet = wait_for_quiet(everyone, max_other_cpu)
        if quiet > max_other_cpu:
            log(f"  the machine stayed busy ({quiet} % CPU used by others); measuring anyway")
        tries.append(measure())
        if tries[-1]["other_cpu_percent"] <= max_other_cpu:
            break
        log(f"  {name}: other processes used {tries[-1]['other_cpu_percent']} % CPU; again")
    best = min(tries, key=lambda summary: summary["other_cpu_percent"])
    return {**best, "tries": len(tries)}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def run_matrix(args, service: Server, reference: Server, images: dict[str, list[Path]],
               cells: list[dict]) -> None:
    """Every cell into `cells`, service then reference back to back, so both see the same machine
    conditions. Cells are appended as they finish, so an interrupted run still reports them."""
    for kind, size, concurrency in itertools.product(INPUTS, args.sizes, args.concurrencies):
        cell = {"input": kind, "size": size, "concurrency": concurrency}
        for server in (service, reference):
            cell[server.name] = measure_quietly(args, server, kind, images[size], concurrency,
                                                [service, reference])
        cell["ratio"] = {
            "requests_per_s": ratio(cell["service"]["requests_per_s"], cell["reference"]["requests_per_s"]),
            "p50": ratio(cell["service"]["p50_ms"], cell["reference"]["p50_ms"]),
        }
        log(f"{kind} {size} c={concurrency}: service {cell['service']['requests_per_s']} req/s, "
            f"reference {cell['reference']['requests_per_s']} req/s")
        cells.append(cell)


def measure_memory(service: Server, paths: list[Path], checkpoints: tuple[int, int]) -> dict:
    """RSS of the whole process group at two points of one steady upload load (concurrency 4).

    The sum counts pages the master and its forked workers share twice; that does not matter for the
    growth between the two checkpoints, which is what shows a leak.
    """
    readings = {"idle": sum(service.rss_bytes().values())}  # then keyed by answer number
    pss_idle = service.pss_bytes()

    def on_answer(number: int) -> None:
        if number in checkpoints:
            readings[number] = sum(service.rss_bytes().values())

    send = make_send(service, "upload", paths)
    other = OtherCpu([service])
    result = run_closed_loop(send, 4, total=checkpoints[1], on_answer=on_answer).summary()
    first, second = readings[checkpoints[0]], readings[checkpoints[1]]
    mib = 1024 * 1024
    by_process = service.rss_bytes()
    master = by_process.pop(service.process.pid, 0)
    return {
        "load": "upload 640x480, concurrency 4", "processes": 1 + len(by_process),
        "rss_master_at_end_mib": round(master / mib, 1),
        "rss_workers_at_end_mib": [round(value / mib, 1) for value in by_process.values()],
        "pss_idle_mib": round(pss_idle / mib, 1), "pss_at_end_mib": round(service.pss_bytes() / mib, 1),
        "rss_idle_mib": round(readings["idle"] / mib, 1),
        f"rss_at_{checkpoints[0]}_mib": round(first / mib, 1),
        f"rss_at_{checkpoints[1]}_mib": round(second / mib, 1),
        "growth_percent": round((second - first) / first * 100, 2),
        "errors": result["errors"], "error_kinds": result["error_kinds"],
        "requests_per_s": result["requests_per_s"], "other_cpu_percent": other.percent(),
    }


# -------------------------------------------------------------------------------------------- reports


def _number(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(cells: list[dict]) -> str:
    header = (f"{'server':<10} {'input':<7} {'size':<10} {'conc':>4} {'req/s':>8} {'p50 ms':>9} "
              f"{'p99 ms':>9} {'errors':>6} {'other%':>6} {'x req/s':>8} {'x p50':>7}")
    lines = [header, "-" * len(header)]
    for cell in cells:
        for name in ("service", "reference"):
            row = cell[name]
            ratios = cell["ratio"]
            ratios = (f"{_number(ratios['requests_per_s'], 2):>8} {_number(ratios['p50'], 2):>7}"
                      if name == "service" else "")
            lines.append(f"{name:<10} {cell['input']:<7} {cell['size']:<10} {cell['concurrency']:>4} "
                         f"{row['requests_per_s']:>8.2f} {_number(row['p50_ms']):>9} "
                         f"{_number(row['p99_ms']):>9} {row['errors']:>6} "
                         f"{_number(row['other_cpu_percent'], 0):>6} {ratios}".rstrip())
    lines.append("x req/s: service/reference requests per second (higher is better); "
                 "x p50: service/reference median latency (lower is better); other%: CPU used by "
                 "processes outside the benchmark during the cell (should be ~0)")
    return "\n".join(lines)


def format_summary(results: dict) -> str:
    startup = results["startup"]
    lines = [f"model: {results['model']}; the service ran {results.get('service_engine')}",
             f"start-up to /health 200: service first start (converts, encodes labels) "
             f"{startup['service_first']['seconds']} s, cold (encodes labels) "
             f"{startup['service_cold']['seconds']} s, warm {startup['service_warm']['seconds']} s; "
             f"reference {startup['reference']['seconds']} s"]
    tower = tower_row(results, results.get("service_engine"))
    for cell in results["cells"]:
        if tower and (cell["input"], cell["size"], cell["concurrency"]) == ("upload", "640x480", 16):
            lines.append(f"upload 640x480 at c=16: {cell['service']['requests_per_s']} req/s = "
                         f"{ratio(cell['service']['requests_per_s'], tower['images_per_s'])} x the bare "
                         f"{results['service_engine']} tower ({tower['images_per_s']} images/s at batch 8)")
    memory = results.get("memory")
    if memory:
        counts = [key for key in memory if key.startswith("rss_at_")]
        lines.append(f"service RSS ({memory['processes']} processes, {memory['load']}): idle "
                     f"{memory['rss_idle_mib']} MiB, " + ", ".join(
                         f"request {key[7:-4]} {memory[key]} MiB" for key in counts)
                     + f", growth {memory['growth_percent']} %, errors {memory['errors']}; PSS (shared "
                     f"pages counted once) idle {memory['pss_idle_mib']} MiB, at the end "
                     f"{memory['pss_at_end_mib']} MiB")
    for note in results.get("service_log", []):
        if any(word in note for word in ("ERROR", "CRITICAL", "Traceback")):
            lines.append(f"service log: {note}")
    busiest = max((cell[name]["other_cpu_percent"], cell["input"], cell["size"], cell["concurrency"], name)
                  for cell in results["cells"] for name in ("service", "reference"))
    if busiest[0] > (results["settings"]["max_other_cpu"] or 10):
        lines.append(f"WARNING: other processes used up to {busiest[0]} % of the CPU during a cell "
                     f"({busiest[4]} {busiest[1]} {busiest[2]} c={busiest[3]}); the machine was not "
                     "quiet, so compare those cells with care")
    return "\n".join(lines)


def format_engines(results: dict) -> str:
    """The bare tower of every engine, and the service on each (640x480 uploads)."""
    lines = []
    if results.get("tower"):
        from bench.tower import TowerFigures

        lines += ["bare image tower (encode_images on prepared photos, no HTTP):",
                  format_tower_table([TowerFigures(**row) for row in results["tower"]]), ""]
    if results.get("engines"):
        header = (f"{'engine':<10}{'precision':<10}{'c=1 req/s':>10}{'c=1 p50':>9}{'c=16 req/s':>11}"
                  f"{'c=16 p50':>9}{'x tower':>9}")
        lines += ["the service on each engine, 640x480 uploads:", header, "-" * len(header)]
        for row in results["engines"]:
            if "c16" not in row:
                failure = row.get("error", "")[:200]
                lines.append(f"{row['backend']:<10}{row['precision']:<10} failed: {failure}")
                continue
            lines.append(f"{row['backend']:<10}{row['precision']:<10}{row['c1']['requests_per_s']:>10.1f}"
                         f"{_number(row['c1']['p50_ms']):>9}{row['c16']['requests_per_s']:>11.1f}"
                         f"{_number(row['c16']['p50_ms']):>9}{_number(row.get('fraction_of_tower'), 2):>9}")
        lines.append("x tower: requests/s at c=16 over the bare tower's images/s at batch 8, same run")
    return "\n".join(lines)


def metadata(args, model_note: str, images: dict[str, list[Path]]) -> dict:
    import torch

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "load_average_at_start": os.getloadavg(),
        "code": git_state(),
        "model": model_note,
        "settings": {"seconds_per_cell": args.seconds, "concurrencies": list(args.concurrencies),
                     "sizes": list(args.sizes), "inputs": list(INPUTS), "quick": args.quick,
                     "memory_requests": list(args.memory_at or ()), "max_other_cpu": args.max_other_cpu,
                     "engines": [f"{backend}:{precision}" for backend, precision in args.engine_list],
                     "service_env": args.extra_env},
        "images": {size: [{"name": p.name, "bytes": p.stat().st_size} for p in paths]
                   for size, paths in images.items()},
    }


# ----------------------------------------------------------------------------------------------- main


def benchmark(args, work: Path, running: list[Server], results: dict) -> None:
    """Fill `results` phase by phase (an interrupted run still writes what it measured)."""
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "cache", ignore_errors=True)  # a first start needs an empty cache (--logs reuse)
    clip_model, model_note = prepare_model(args, work / "model")
    log(f"model: {model_note}")
    images = make_images(work / "images", args.sizes)
    results.update(metadata(args, model_note, images))
    if args.engine_list:
        log("bare image tower: " + ", ".join(f"{b} {p}" for b, p in args.engine_list))
        results["tower"] = [vars(row) for row in measure_towers(
            clip_model, work / "tower-cache", args.engine_list, seconds=min(args.seconds, 4.0), log=log,
            device=args.device, before_timing=lambda: quiet_moment(args))]
    startup = results.setdefault("startup", {})
    first = service_server(args, clip_model, work, "service-first")
    startup["service_first"] = start(first, running, args.start_timeout)
    first.stop()
    for path in (work / "cache").glob("label-features-*"):  # the converted model stays
        path.unlink()
    cold = service_server(args, clip_model, work, "service-cold")
    startup["service_cold"] = start(cold, running, args.start_timeout)
    cold.stop()
    service = service_server(args, clip_model, work, "service")
    startup["service_warm"] = start(service, running, args.start_timeout)
    results["service_log"] = log_notes(first) + log_notes(cold) + log_notes(service)
    results["service_engine"] = ready_engine(service)
    if args.memory_at:
        log(f"memory: {args.memory_at[1]} uploads at concurrency 4")
        results["memory"] = measure_memory(service, images["640x480"], args.memory_at)
    reference = reference_server(clip_model, work)
    startup["reference"] = start(reference, running, args.start_timeout)
    run_matrix(args, service, reference, images, results.setdefault("cells", []))
    results["rss_after_matrix_mib"] = {server.name: round(sum(server.rss_bytes().values()) / 2**20, 1)
                                       for server in (service, reference)}
    service.stop()
    reference.stop()
    if "640x480" in images:
        run_engines(args, clip_model, work, images["640x480"], running, results)


def quiet_moment(args) -> None:
    """With --max-other-cpu, wait (at most 2 minutes) for other processes to calm down first."""
    if args.max_other_cpu is not None:
        busy = wait_for_quiet([], args.max_other_cpu)
        if busy > args.max_other_cpu:
            log(f"  the machine stayed busy ({busy} % CPU used by others); measuring anyway")


def tower_row(results: dict, engine: str | None) -> dict | None:
    """The bare tower's figures for "backend precision", if measured."""
    return next((row for row in results.get("tower", [])
                 if f"{row['backend']} {row['precision']}" == engine), None)


def ready_engine(server: Server) -> str | None:
    """"openvino bf16" from the service's Ready line: which engine CLIP_BACKEND=auto picked."""
    text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
    for line in text.splitlines():
        if "Ready: " in line and " with " in line:
            return line.split(" with ", 1)[1].split(",", 1)[0].replace(" in ", " ")
    return None


def run_engines(args, clip_model: str, work: Path, paths: list[Path], running: list[Server],
                results: dict) -> None:
    """The service on each engine and precision: 640x480 uploads at concurrency 1 and 16.

    One prompt template (CLIP_PROMPT_TEMPLATE) so each start encodes 2,049 texts, not 8 times as many:
    start-up is measured above, and requests do not depend on the number of templates.
    """
    rows = results.setdefault("engines", [])
    for backend, precision in args.engine_list:
        args_for_engine = argparse.Namespace(**{**vars(args), "extra_env": {
            **args.extra_env, "CLIP_BACKEND": backend, "CLIP_PRECISION": precision,
            "CLIP_PROMPT_TEMPLATE": "a photo of a {}."}})
        server = service_server(args_for_engine, clip_model, work, f"service-{backend}-{precision}")
        row = {"backend": backend, "precision": precision}
        try:
            row["startup"] = start(server, running, args.start_timeout)
            row["engine"] = ready_engine(server)
            for concurrency in ENGINE_CONCURRENCIES:
                row[f"c{concurrency}"] = measure_quietly(args, server, "upload", paths, concurrency, [server])
        except RuntimeError as error:  # e.g. a precision this CPU cannot run: a row saying so
            row["error"] = str(error)[-500:]
        finally:
            server.stop()
        tower = tower_row(results, f"{backend} {precision}")
        if tower and "c16" in row:
            row["fraction_of_tower"] = ratio(row["c16"]["requests_per_s"], tower["images_per_s"])
        log(f"engine {backend} {precision}: " + (f"{row['c16']['requests_per_s']} req/s at c=16"
                                                 if "c16" in row else row.get("error", "")))
        rows.append(row)


def log_notes(server: Server, limit: int = 40) -> list[str]:
    """The service's own account of itself (precision, label encoding or cache, warnings, errors),
    without the per-request lines: what a reader needs to interpret the figures."""
    text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
    notes = [f"{server.name}: {line}" for line in text.splitlines()
             if "clip_service.requests" not in line
             and any(word in line for word in NOTE_WORDS)]
    return notes[:limit]


def report_failure(running: list[Server]) -> None:
    """Each server's state and log tail, before the temporary folder (and its logs) is gone."""
    for server in running:
        code = server.process.poll() if server.process else None
        state = "still running" if server.process and code is None else f"exited with {code}"
        log(f"{server.name} ({state}), last lines of {server.log_path}:\n{server.log_tail(40)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    running: list[Server] = []
    results: dict = {"complete": False}
    with tempfile.TemporaryDirectory(prefix="clip-bench-") as tmp:
        try:
            benchmark(args, args.logs or Path(tmp), running, results)
            results["complete"] = True
        except BaseException:
            report_failure(running)
            raise
        finally:
            for server in running:
                server.stop()
            if len(results) > 1:  # something was measured; never clobber a file with nothing
                write_json(args.out, results)
    print(format_table(results["cells"]))
    print()
    engines = format_engines(results)
    if engines:
        print(engines)
        print()
    print(format_summary(results))
    print(f"\nJSON: {args.out}")


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    if not results["complete"]:
        log(f"incomplete results written to {path}")


if __name__ == "__main__":
    main()
