"""A real peer, side by side: this service's /embed against infinity (infinity-emb), the same
architecture with the same random weights, the same photos and the same closed-loop load, in one run.

    .venv/bin/python -m bench.peers [--arch ViT-B-32] [--max-other-cpu 20]      # from the root

infinity is installed on first use in a venv of its own under the work folder (bench/work/peers,
git-ignored; reused when its requirements are unchanged), never in the project's requirements. The
weights are written once in open_clip's `local-dir:` layout (the service's) and converted to the
Hugging Face CLIPModel layout (infinity's, bench/hf_clip.py); before anything is timed, transformers'
CLIPModel in infinity's venv and open_clip in this one must give the same features (bench/hf_check.py).

How each server is fed: the service gets each 640x480 JPEG as a multipart upload to POST /embed (field
`file`, as its README shows); infinity gets the same JPEG bytes as a base64 data URI in its
OpenAI-style JSON, POST /embeddings {"model", "input": ["data:image/jpeg;base64,..."],
"modality": "image"} (infinity takes images as URLs or data URIs; a URL would add a fetch). One image per
request, bodies encoded once, both answers float JSON. Prints the table, then the two ratios.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import requests
import torch

from bench.load import REQUEST_TIMEOUT, Send, upload_request
from bench.speed import (
    Server,
    git_state,
    log,
    make_images,
    quiet_moment,
    quietly,
    ratio,
    ready_engine,
    rotate,
    service_server,
    start,
    timed_cell,
)
from bench.tower import measure as measure_towers
from tests.support.http_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
INFINITY = "infinity-emb"
INFINITY_VERSION = "0.0.78"
# [server] and what infinity's torch image tower needs. Not its [vision] extra: that adds colpali-engine
# (for ColPali models, not CLIP), whose torch bound pulls an older CUDA torch from PyPI. transformers: the
# last 4.x, the series infinity 0.0.78 names (its ct2 extra: >=4.47,<=5.0).
PEER_REQUIREMENTS = (f"{INFINITY}[server]=={INFINITY_VERSION}", "transformers==4.57.6", "pillow", "aiohttp")
TORCH_REQUIREMENTS = ("torch==2.14.1", "torchvision==0.29.1")  # the project's pair (requirements.txt)
SIZE = "640x480"
CONCURRENCIES = (1, 16)
PEER_ENV = {  # no hub (the model is a local folder), no usage reports
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    "DO_NOT_TRACK": "1",
}
SAME_FEATURES = 0.9999  # least cosine, HF CLIPModel against open_clip on the same pixels and tokens
SAME_PREPROCESSING = 0.999  # least cosine, each model through its own preprocessing of the same photos


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture written full size with "
                        "random weights (default ViT-B-32); 'tiny' for the tests' model (a smoke run)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "peers",
                        help="work folder: infinity's venv, the models, logs (default bench/work/peers)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per timed cell (default 8)")
    parser.add_argument("--concurrency", default="1,16", help="client counts (default 1,16)")
    parser.add_argument("--max-other-cpu", type=float, metavar="PCT", help="for a shared machine: start "
                        "each cell once other processes use at most PCT %% of the CPU (waiting up to 2 "
                        "minutes), re-measure a disturbed cell (at most twice more), keep the least "
                        "disturbed try")
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra service setting (repeatable)")
    parser.add_argument("--infinity-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for `infinity_emb v2` (repeatable), e.g. "
                        "--infinity-arg=--compile")
    parser.add_argument("--peer-system-torch", action="store_true", help="make infinity's venv with "
                        "--system-site-packages and install no torch (a GPU machine's own torch)")
    parser.add_argument("--peer-pip-args", default="", help="extra pip arguments for infinity's venv, "
                        "e.g. '--no-index --find-links .whl/peers' on a machine without network")
    parser.add_argument("--no-towers", action="store_true", help="skip the bare image towers (timed "
                        "after the servers, as the bound)")
    parser.add_argument("--start-timeout", type=float, default=1800, help="seconds a server may take to "
                        "become healthy (default 1800)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "peers-results.json",
                        help="where the JSON goes (default bench/peers-results.json)")
    args = parser.parse_args(argv)
    args.concurrencies = tuple(int(item) for item in args.concurrency.split(","))
    args.extra_env = {key: value for key, _, value in (item.partition("=") for item in args.service_env)}
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.work = args.work.resolve()
    return args


# ------------------------------------------------------------------------------------ infinity's venv


def peer_venv(folder: Path, system_torch: bool, pip_args: str) -> Path:
    """infinity's venv (its python), made and installed on first use, reused while its requirements
    are the same (a marker file lists them)."""
    requirements = list(PEER_REQUIREMENTS) + ([] if system_torch else list(TORCH_REQUIREMENTS))
    wanted = "\n".join([*requirements, f"system-site-packages={system_torch}", pip_args]) + "\n"
    marker, python = folder / "bench-requirements.txt", folder / "bin" / "python"
    if marker.exists() and marker.read_text() == wanted and python.exists():
        return python
    log(f"installing {INFINITY} {INFINITY_VERSION} into {folder} (first use: several minutes)")
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", *(["--system-site-packages"] if system_torch else []),
                    str(folder)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-cache-dir", *pip_args.split(),
                    *requirements], check=True)
    marker.write_text(wanted)
    return python


def peer_versions(python: Path) -> dict:
    """The peer venv's versions and torch's thread count."""
    script = ("import importlib.metadata as m, json, torch; print(json.dumps({n: m.version(n) for n in "
              "('infinity_emb', 'transformers', 'torch')} | {'threads': torch.get_num_threads()}))")
    return json.loads(subprocess.run([str(python), "-c", script], capture_output=True, text=True,
                                     check=True).stdout)


# ----------------------------------------------------------------------------------------- the model


def write_models(arch: str, work: Path) -> tuple[Path, Path, str]:
    """The open_clip local-dir model (seeded random weights) and its CLIPModel copy."""
    import open_clip

    from bench.hf_clip import write_hf_clip
    from tests.support.models import write_tiny_clip

    local = work / "model"
    shutil.rmtree(local, ignore_errors=True)
    if arch == "tiny":
        write_tiny_clip(local)
        note = "tests/support/models.py tiny model (random weights)"
    else:
        config = open_clip.get_model_config(arch)
        if config is None:
            raise SystemExit(f"--arch {arch}: not an open_clip architecture; see open_clip.list_models()")
        write_tiny_clip(local, model_cfg=config)
        note = f"{arch}, full size, random weights"
    hf = write_hf_clip(local, work / "hf-model")
    return local, hf, note


def check_conversion(python: Path, local: Path, hf: Path, photos: list[Path], folder: Path) -> dict:
    """The least cosine between open_clip's features (the torch engine, fp32) and transformers'
    CLIPModel's on the converted folder: the same pixels, the same tokens, and each side's own
    preprocessing of the photos. Fails below SAME_FEATURES / SAME_PREPROCESSING."""
    from PIL import Image

    from clip_service.engines.registry import load_engine
    from clip_service.engines.spec import parse_model_spec

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    engine = load_engine(parse_model_spec(f"local-dir:{local}"), "cpu", "fp32", "torch")
    images = [Image.open(path).convert("RGB") for path in photos]
    pixels = torch.stack([engine.preprocess(image) for image in images])  # (N, 3, H, W) float
    texts = ["a photo of a dog", "a diagram", "an astronaut on the moon"]
    tokens = engine.tokenizer(texts)  # (M, 77)
    numpy.save(folder / "pixels.npy", pixels.float().numpy())
    numpy.save(folder / "tokens.npy", tokens.numpy().astype(numpy.int64))
    for index, path in enumerate(photos):
        shutil.copy(path, folder / f"photo-{index}.jpg")
    subprocess.run([str(python), str(ROOT / "bench" / "hf_check.py"), str(hf), str(folder)], check=True,
                   env={**os.environ, **PEER_ENV})
    with torch.inference_mode():
        ours = {"image": engine.encode_images(pixels), "processed": engine.encode_images(pixels),
                "text": torch.nn.functional.normalize(engine.model.encode_text(tokens).float(), dim=-1)}
    theirs = {name: torch.nn.functional.normalize(torch.from_numpy(numpy.load(folder / f"{name}.npy")),
                                                  dim=-1) for name in ours}
    cosines = {name: round((ours[name] * theirs[name]).sum(-1).min().item(), 6) for name in ours}
    if min(cosines["image"], cosines["text"]) < SAME_FEATURES or cosines["processed"] < SAME_PREPROCESSING:
        raise SystemExit(f"the converted CLIPModel does not give open_clip's features: {cosines}")
    return {"least_cosine": cosines,
            "max_abs_difference": {name: float(f"{(ours[name] - theirs[name]).abs().max().item():.2e}")
                                   for name in ours}}  # of unit vectors


# ------------------------------------------------------------------------------------------- servers


def infinity_server(python: Path, hf: Path, work: Path, device: str, extra: list[str]) -> Server:
    port = free_port()
    command = [str(python.parent / "infinity_emb"), "v2", "--model-id", str(hf), "--served-model-name",
               "clip", "--host", "127.0.0.1", "--port", str(port), "--engine", "torch", "--device", device,
               *extra]
    env = {**PEER_ENV, "HF_HOME": str(work / "hf-home")}
    return Server("infinity", command, env, port, work / "infinity.log")


def service_send(server: Server, photos: list[Path]) -> Send:
    return rotate([upload_request(f"{server.base}/embed", path.read_bytes(), path.name) for path in photos])


def infinity_send(server: Server, photos: list[Path]) -> Send:
    """POST /embeddings with the photo as a data URI; each body is encoded once."""
    url, headers = f"{server.base}/embeddings", {"Content-Type": "application/json"}
    bodies = [json.dumps({"model": "clip", "modality": "image", "input": [
        "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()]}).encode()
        for path in photos]
    return rotate([lambda session, body=body: session.post(url, data=body, headers=headers,
                                                           timeout=REQUEST_TIMEOUT) for body in bodies])


def embeddings(send: Send, count: int, server: str) -> torch.Tensor:
    """`count` answers' vectors (a checked success each), one per photo in turn: (count, D)."""
    vectors = []
    with requests.Session() as session:
        for _ in range(count):
            response = send(session)
            if response.status_code != 200:
                raise RuntimeError(f"{server}: {response.status_code} {response.text[:300]}")
            body = response.json()
            vectors.append(body["embeddings"][0] if server == "service" else body["data"][0]["embedding"])
    return torch.tensor(vectors)


def memory_mib(server: Server) -> dict:
    return {"rss_mib": round(sum(server.rss_bytes().values()) / 2**20, 1),
            "pss_mib": round(server.pss_bytes() / 2**20, 1)}


# ------------------------------------------------------------------------------------------------ run


def benchmark(args, running: list[Server], results: dict) -> None:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    for old_log in work.glob("*.log"):  # the servers append; the engine is read from this run's lines
        old_log.unlink()
    python = peer_venv(work / "infinity-venv", args.peer_system_torch, args.peer_pip_args)
    # infinity's image tower is torch only; on a CPU it loads float32, on CUDA its auto dtype is fp16
    dtype = "fp16" if args.device == "cuda" else "fp32"
    if "--dtype" in args.infinity_arg[:-1]:
        dtype = args.infinity_arg[args.infinity_arg.index("--dtype") + 1]
    results["infinity"] = peer_versions(python) | {"dtype": dtype}
    local, hf, results["model"] = write_models(args.arch, work)
    photos = make_images(work / "images", (SIZE,))[SIZE]
    results["images"] = [{"name": path.name, "bytes": path.stat().st_size} for path in photos]
    log(f"model: {results['model']}; checking the CLIPModel copy against open_clip")
    results["conversion"] = check_conversion(python, local, hf, photos, work / "check")
    log(f"conversion: {results['conversion']}")

    # The service as CLIP.sh starts it, one prompt template (start-up encodes 2,049 texts, not 8 x as
    # many: infinity encodes none); first start (converts, encodes) and warm start (both cached).
    args.extra_env = {"CLIP_PROMPT_TEMPLATE": "a photo of a {}.", **args.extra_env}
    shutil.rmtree(work / "cache", ignore_errors=True)
    startup = results["startup"] = {}
    first = service_server(args, f"local-dir:{local}", work, "service-first")
    startup["service_first"] = start(first, running, args.start_timeout)["seconds"]
    first.stop()
    service = service_server(args, f"local-dir:{local}", work, "service")
    startup["service"] = start(service, running, args.start_timeout)["seconds"]
    results["service_engine"] = ready_engine(service)
    peer = infinity_server(python, hf, work, args.device, args.infinity_arg)
    startup["infinity"] = start(peer, running, args.start_timeout)["seconds"]
    results["memory_idle"] = {"service": memory_mib(service), "infinity": memory_mib(peer)}

    sends = {"service": service_send(service, photos), "infinity": infinity_send(peer, photos)}
    vectors = {name: embeddings(send, len(photos), name) for name, send in sends.items()}
    results["answers_cosine"] = round(torch.nn.functional.cosine_similarity(
        vectors["service"], vectors["infinity"], dim=-1).min().item(), 5)
    servers = {"service": service, "infinity": peer}
    cells = results["cells"] = []
    everyone = [service, peer]
    for concurrency in args.concurrencies:  # the two servers back to back, so both see the same machine
        cell = {"concurrency": concurrency}
        for name, send in sends.items():
            cell[name] = quietly(args.max_other_cpu, name, everyone, lambda send=send, clients=concurrency:
                                 timed_cell(send, clients, args.seconds, everyone))
            log(f"c={concurrency} {name}: {cell[name]['requests_per_s']} images/s, "
                f"p50 {cell[name]['p50_ms']} ms")
        cells.append(cell)
    results["memory_after_load"] = {name: memory_mib(server) for name, server in servers.items()}
    for server in (service, peer):
        server.stop()
    if not args.no_towers:
        results["towers"] = bare_towers(args, local, work, results["service_engine"])


def bare_towers(args, local: Path, work: Path, service_engine: str | None) -> list[dict]:
    """The bound, in the same run: bench/tower.py's bare image tower (prepared photos, no HTTP) of the
    service's engine and of torch at infinity's precision (its CLIPModel runs the same torch ops)."""
    peer_engine = ("torch", "fp16" if args.device == "cuda" else "fp32")
    engines = [peer_engine]
    if service_engine and tuple(service_engine.split()) != peer_engine:
        engines.append(tuple(service_engine.split()))
    log("bare image towers: " + ", ".join(" ".join(engine) for engine in engines))
    rows = measure_towers(f"local-dir:{local}", work / "tower-cache", engines, seconds=3.0, log=log,
                          device=args.device, before_timing=lambda: quiet_moment(args))
    return [vars(row) for row in rows]


def cell_of(results: dict, concurrency: int) -> dict | None:
    return next((cell for cell in results.get("cells", []) if cell["concurrency"] == concurrency), None)


def format_report(results: dict) -> str:
    concurrencies = [cell["concurrency"] for cell in results["cells"]]
    header = f"{'server':<10}{'engine':<22}{'start s':>8}{'RSS MiB':>9}{'loaded':>8}" + "".join(
        f"{f'c{c} img/s':>11}{f'c{c} p50':>9}{f'c{c} p99':>9}" for c in concurrencies) + f"{'other%':>8}"
    infinity = results["infinity"]
    engines = {"service": results.get("service_engine") or "?",
               "infinity": f"{infinity['infinity_emb']} torch {infinity.get('dtype', 'fp32')}"}
    lines = [header, "-" * len(header)]
    for name in ("service", "infinity"):
        row = (f"{name:<10}{engines[name][:21]:<22}{results['startup'][name]:>8.1f}"
               f"{results['memory_idle'][name]['rss_mib']:>9.0f}{results['memory_after_load'][name]['rss_mib']:>8.0f}")
        for cell in results["cells"]:
            figures = cell[name]
            row += (f"{figures['requests_per_s']:>11.1f}{figures['p50_ms'] or 0:>9.1f}"
                    f"{figures['p99_ms'] or 0:>9.1f}")
        busiest = max(cell[name]["other_cpu_percent"] for cell in results["cells"])
        errors = sum(cell[name]["errors"] for cell in results["cells"])
        lines.append(row + f"{busiest:>8.0f}" + (f"  ({errors} errors)" if errors else ""))
    lines += [
        f"model: {results['model']}; {SIZE} JPEG q90 photos (astronaut, chelsea, coffee), one per request",
        "service: multipart POST /embed (CLIP.sh defaults, one prompt template); infinity: POST /embeddings "
        "with a base64 data URI, modality image (infinity_emb v2 --engine torch, its defaults"
        + "".join(f" {arg}" for arg in results["settings"]["infinity_args"]) + ")",
        f"start s: process start to the first /health 200 (the service's first start, converting the model "
        f"and encoding its labels: {results['startup']['service_first']} s); RSS: resident MiB of the whole "
        "process group, idle after start and after the load",
        f"conversion check, CLIPModel vs open_clip fp32 (unit vectors): least cosine "
        f"{results['conversion']['least_cosine']}, largest difference "
        f"{results['conversion']['max_abs_difference']}",
        f"the two servers' answers for the same photos (the service's {results.get('service_engine')} vs "
        f"infinity's {results['infinity']['dtype']}): least cosine {results['answers_cosine']}",
        "other%: most CPU other processes used during a cell (should be ~0)",
    ]
    towers = results.get("towers", [])
    top = cell_of(results, max(concurrencies))
    if towers and top:  # each server's images/s at its top concurrency over its engine's bare tower
        engines = {"service": results.get("service_engine"), "infinity": f"torch {towers[0]['precision']}"}
        parts = []
        for row in towers:
            name = f"{row['backend']} {row['precision']}"
            shares = ", ".join(f"{server} at c{top['concurrency']}: "
                               f"{ratio(top[server]['requests_per_s'], row['images_per_s'])} x it"
                               for server, engine in engines.items() if engine == name)
            parts.append(f"{name} {row['images_per_s']}" + (f" ({shares})" if shares else ""))
        lines.append("bare image towers, same run, images/s at batch 8: " + "; ".join(parts))
    return "\n".join(lines)


def ratio_lines(results: dict) -> list[str]:
    top, one = cell_of(results, 16), cell_of(results, 1)
    lines = []
    if top:
        figure = ratio(top["service"]["requests_per_s"], top["infinity"]["requests_per_s"])
        lines.append(f"images/s at c16: {figure} x infinity")
    if one:
        lines.append(f"p50 at c1: {ratio(one['service']['p50_ms'], one['infinity']['p50_ms'])} x infinity")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    running: list[Server] = []
    results: dict = {
        "complete": False, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "cpu": cpu_name()},
        "load_average_at_start": os.getloadavg(), "code": git_state(),
        "settings": {"seconds_per_cell": args.seconds, "concurrencies": list(args.concurrencies),
                     "max_other_cpu": args.max_other_cpu, "service_env": args.extra_env,
                     "infinity_args": args.infinity_arg, "device": args.device},
    }
    try:
        benchmark(args, running, results)
        results["complete"] = True
    except BaseException:
        for server in running:
            log(f"{server.name}: last lines of {server.log_path}:\n{server.log_tail(30)}")
        raise
    finally:
        for server in running:
            server.stop()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(format_report(results))
    print(f"JSON: {args.out}")
    for line in ratio_lines(results):
        print(line)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
