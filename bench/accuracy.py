"""Accuracy benchmark: how often the service's model, labels and prompts name what is in a photo.

    .venv/bin/python -m bench.accuracy FOLDER [--model CLIP_MODEL] [--labels folders|all] [--json FILE]
    .venv/bin/python -m bench.accuracy FOLDER --compare MODEL [MODEL ...] [--json FILE]

Run it from the repository root, as a module of the bench package.

FOLDER is in the ImageFolder layout: one sub-folder per expected label (`_` reads as a space), the
images inside. Report A (the default) runs the service's own engine and gives top-1 and top-5 accuracy
for the service's prompt ensemble and for the seed's single prompt "a picture of a {}", side by side,
with the confusions that cost the most. Report B (`--compare`) gives, for each candidate model, the
accuracy with the ensemble and its image-encoding throughput on this machine, next to its published
ImageNet zero-shot top-1; a model whose weights cannot be had is reported as unavailable. See
bench/ACCURACY.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clip_service.engines.base import Engine, ModelLoadError
from clip_service.engines.registry import load_engine
from clip_service.engines.spec import parse_model_spec
from clip_service.inputs.images import ImageLimits, decode_image
from clip_service.settings import Settings
from clip_service.tasks.classify import label_probabilities
from clip_service.vocabulary.features import build_vocabulary
from clip_service.vocabulary.labels import LabelsError, LabelSet, load_labels, load_templates

ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("accuracy")

DEFAULTS = Settings()
SEED_PROMPT = "a picture of a {}"  # the original service's one prompt
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})
TOP_K = (1, 5)
PROMPT_SETS = ("ensemble", "single")  # the service's templates; the seed's single prompt

# Published ImageNet zero-shot top-1 (%), for the names the service accepts. OpenAI's from the CLIP
# paper / open_clip's results table, SigLIP's from open_clip's table, MobileCLIP's from Apple's paper.
PUBLISHED = {
    "ViT-B/32": 63.3,
    "ViT-B/16": 68.3,
    "ViT-L/14": 75.5,
    "ViT-B-16-SigLIP:webli": 76.0,
    "MobileCLIP-S2:datacompdr": 74.4,
}
# The same weights under open_clip's own ARCH:openai spelling.
_OPENAI_ALIASES = {"ViT-B-32:openai": "ViT-B/32", "ViT-B-16:openai": "ViT-B/16",
                   "ViT-L-14:openai": "ViT-L/14"}


# --------------------------------------------------------------------------------- the arithmetic


def target_ranks(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, L) scores and (N,) target indices -> (N,) rank of each target in its row, 1 = best.

    A label that ties with the target does not push it down: ties count in the target's favour.
    """
    target_scores = probabilities.gather(1, targets.view(-1, 1).long())  # (N, 1)
    return (probabilities > target_scores).sum(dim=-1) + 1


def topk_correct(probabilities: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    """(N, L) scores and (N,) target indices -> how many targets are among their row's k best.

    k larger than L counts every row as correct (all candidates are "in the top k").
    """
    if probabilities.shape[0] == 0:
        return 0
    return int((target_ranks(probabilities, targets) <= k).sum())


def topk_accuracy(probabilities: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """The fraction of rows whose target is among the k highest scores; 0.0 for no rows."""
    count = probabilities.shape[0]
    return topk_correct(probabilities, targets, k) / count if count else 0.0


def confusion_pairs(predicted: Sequence[int], targets: Sequence[int], names: Sequence[str],
                    top: int) -> list[tuple[str, str, int]]:
    """The `top` most frequent mistakes as (expected name, predicted name, count).

    Most frequent first; equal counts in order of expected, then predicted name, so the output is
    stable. Correct predictions are not pairs.
    """
    counts = Counter((int(t), int(p)) for p, t in zip(predicted, targets, strict=True) if int(p) != int(t))
    pairs = [(names[t], names[p], n) for (t, p), n in counts.items()]
    pairs.sort(key=lambda pair: (-pair[2], pair[0], pair[1]))
    return pairs[:max(top, 0)]


def per_class_top1(predicted: Sequence[int], targets: Sequence[int], names: Sequence[str],
                   ) -> dict[str, dict[str, float | int]]:
    """For each expected name that has images: its image count, top-1 hits and top-1 accuracy."""
    images: Counter[int] = Counter(int(t) for t in targets)
    hits: Counter[int] = Counter(int(t) for p, t in zip(predicted, targets, strict=True) if int(p) == int(t))
    return {names[t]: {"images": n, "top1_correct": hits[t], "top1": hits[t] / n}
            for t, n in sorted(images.items(), key=lambda item: names[item[0]])}


def folder_label(name: str) -> str:
    """A sub-folder's name -> the label it stands for: `_` reads as a space, spaces collapsed."""
    return " ".join(name.replace("_", " ").split())


def published_top1(model: str) -> float | None:
    """The published ImageNet zero-shot top-1 (%) of a CLIP_MODEL name, None when not known."""
    name = model.strip()
    return PUBLISHED.get(name, PUBLISHED.get(_OPENAI_ALIASES.get(name, "")))


def short_reason(reason: str, width: int = 110) -> str:
    """The first sentence-ish part of a load error, for a table cell."""
    text = reason.split(". Provide the weights")[0].split("\n")[0]
    return text if len(text) <= width else text[:width - 3] + "..."


# -------------------------------------------------------------------------------------- the images


@dataclass
class ImageFolderSet:
    """An ImageFolder tree: classes (folder name, label) and (path, class index) per image."""

    root: Path
    classes: list[tuple[str, str]]
    files: list[tuple[Path, int]]
    ignored: list[Path] = field(default_factory=list)  # not an image extension, or outside a class

    def count(self, index: int) -> int:
        return sum(1 for _, cls in self.files if cls == index)


def scan_image_folder(root: Path, per_class: int = 0) -> ImageFolderSet:
    """Sub-folders of root are the classes (sorted, hidden ones skipped); images anywhere below each.

    Only files with an image extension are taken (as torchvision's ImageFolder does); `per_class`
    keeps at most that many per class (0: all), the first in path order.
    """
    root = Path(root)
    classes, files, ignored = [], [], []
    for entry in sorted(root.iterdir(), key=lambda path: path.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            ignored.append(entry)
            continue
        index = len(classes)
        classes.append((entry.name, folder_label(entry.name)))
        found = []
        for folder, dirs, names in os.walk(entry):
            dirs[:] = sorted(name for name in dirs if not name.startswith("."))
            for name in sorted(names):
                path = Path(folder, name)
                if name.startswith("."):
                    continue
                (found if path.suffix.lower() in IMAGE_EXTENSIONS else ignored).append(path)
        found.sort(key=lambda path: path.parts)
        files += [(path, index) for path in (found[:per_class] if per_class > 0 else found)]
    return ImageFolderSet(root, classes, files, ignored)


@dataclass(frozen=True)
class Candidates:
    """The labels every image is scored against, and each class's index among them (None: missing)."""

    mode: str
    label_set: LabelSet
    class_target: list[int | None]
    missing: list[str]  # class labels not in the vocabulary (mode "all")


def resolve_candidates(dataset: ImageFolderSet, mode: str, labels_dir: Path) -> Candidates:
    """`folders`: the class labels themselves; `all`: the service's vocabulary from labels_dir.

    Labels match case-insensitively, as the service's vocabulary de-duplicates them.
    """
    if mode == "folders":
        unique = list(dict.fromkeys(label.casefold() for _, label in dataset.classes))
        first = {}
        for _, label in dataset.classes:
            first.setdefault(label.casefold(), label)
        label_set = LabelSet(tuple(first[key] for key in unique))
    else:
        label_set = load_labels(labels_dir)
    index = {label.casefold(): i for i, label in enumerate(label_set.labels)}
    targets = [index.get(label.casefold()) for _, label in dataset.classes]
    missing = [label for (_, label), target in zip(dataset.classes, targets, strict=True) if target is None]
    return Candidates(mode, label_set, targets, missing)


@dataclass
class Encoded:
    """Image features of the images that could be read, and what it took."""

    features: torch.Tensor  # (N, D) unit float32
    targets: torch.Tensor  # (N,) candidate index of each image's expected label
    paths: list[Path]  # (N,) the file of each row
    skipped: list[dict[str, str]]
    encode_seconds: float  # model time only, after the warm-up
    decode_seconds: float  # reading, decoding and preparing (wall time of the decode pool)

    @property
    def images_per_s(self) -> float | None:
        count = self.features.shape[0]
        return count / self.encode_seconds if count and self.encode_seconds > 0 else None


def _load_one(engine: Engine, path: Path, limits: ImageLimits) -> tuple[torch.Tensor | None, str]:
    """Read, decode (with the engine's draft size, as the service does) and prepare one file."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, f"cannot be read ({error.strerror or error})"
    try:
        image = decode_image(data, limits, engine.input_size)
        return engine.prepare(image), ""
    except Exception as error:  # the service's BadInput/TooLarge, or anything a broken file causes
        return None, getattr(error, "message", None) or f"{type(error).__name__}: {error}"


def encode_folder(engine: Engine, files: list[tuple[Path, int]], targets: list[int],
                  batch_size: int = 32, limits: ImageLimits | None = None, workers: int = 4) -> Encoded:
    """Encode every readable image once, in batches; unreadable files are skipped with a warning.

    The first batch is encoded once untimed (warm-up: allocation, kernel choice), then every batch is
    timed around `engine.encode_images` alone, which returns on the CPU, so GPU work is included.
    """
    limits = limits or ImageLimits(DEFAULTS.max_image_bytes, DEFAULTS.max_image_pixels)
    features, kept, paths, skipped = [], [], [], []
    encode_seconds = decode_seconds = 0.0
    warmed = False
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(files), batch_size):
            batch = files[start:start + batch_size]
            began = time.perf_counter()
            loaded = list(pool.map(lambda item: _load_one(engine, item[0], limits), batch))
            decode_seconds += time.perf_counter() - began
            pixels = []
            for (path, _), target, (tensor, reason) in zip(batch, targets[start:start + batch_size],
                                                            loaded, strict=True):
                if tensor is None:
                    log.warning("Skipping %s: %s", path, reason)
                    skipped.append({"path": str(path), "reason": reason})
                    continue
                pixels.append(tensor)
                kept.append(target)
                paths.append(path)
            if not pixels:
                continue
            stacked = torch.stack(pixels)
            if not warmed:
                engine.encode_images(stacked)
                warmed = True
            began = time.perf_counter()
            features.append(engine.encode_images(stacked))
            encode_seconds += time.perf_counter() - began
            done = min(start + batch_size, len(files))
            if (start // batch_size) % 10 == 9 or done == len(files):
                log.info("Encoded %d/%d images", done, len(files))
    width = features[0].shape[1] if features else 0
    return Encoded(torch.cat(features) if features else torch.zeros(0, width),
                   torch.tensor(kept, dtype=torch.long), paths, skipped, encode_seconds, decode_seconds)


# ------------------------------------------------------------------------------------- the scoring


def evaluate(image_features: torch.Tensor, targets: torch.Tensor, text_features: torch.Tensor,
             engine: Engine, names: Sequence[str], top_confusions: int,
             paths: Sequence[Path] | None = None, chunk: int = 1024) -> dict:
    """Top-1/top-5 and the costliest confusions of the images against one set of label features.

    Scores are the service's own rule (`label_probabilities`: softmax, or sigmoid for SigLIP). With
    `paths`, every top-1 mistake is listed too, for a look at the photos: path, expected and predicted
    label, the predicted label's confidence, the expected label's confidence and rank (1 = best).
    """
    count = image_features.shape[0]
    correct = dict.fromkeys(TOP_K, 0)
    predicted, confidence, expected_confidence, expected_rank = [], [], [], []
    for start in range(0, count, chunk):
        probabilities = label_probabilities(image_features[start:start + chunk], text_features,
                                            engine.logit_scale, engine.logit_bias)
        part = targets[start:start + chunk]
        for k in TOP_K:
            correct[k] += topk_correct(probabilities, part, k)
        ranks = target_ranks(probabilities, part)
        best = probabilities.max(dim=-1)
        # Rank 1 is a hit even when another label ties with it, so top-1 hits, errors and
        # mistakes always agree; a miss's best label is strictly above the target.
        predicted += torch.where(ranks == 1, part, best.indices).tolist()
        confidence += best.values.tolist()
        expected_confidence += probabilities.gather(1, part.view(-1, 1))[:, 0].tolist()
        expected_rank += ranks.tolist()
    target_list = targets.tolist()
    errors = count - correct[1]
    result = {"images": count, "candidates": len(names), "errors": errors}
    for k in TOP_K:
        result[f"top{k}_correct"] = correct[k]
        result[f"top{k}"] = correct[k] / count if count else 0.0
    result["top5_is_trivial"] = len(names) <= 5
    result["confusions"] = [{"expected": e, "predicted": p, "count": n}
                            for e, p, n in confusion_pairs(predicted, target_list, names, top_confusions)]
    result["per_class"] = per_class_top1(predicted, target_list, names)
    if paths is not None:
        result["mistakes"] = [
            {"path": str(path), "expected": names[t], "predicted": names[p], "confidence": round(c, 4),
             "expected_confidence": round(e, 4), "expected_rank": r}
            for path, p, t, c, e, r in zip(paths, predicted, target_list, confidence, expected_confidence,
                                           expected_rank, strict=True) if p != t]
    return result


def text_features(engine: Engine, label_set: LabelSet, templates: tuple[str, ...],
                  cache_dir: Path) -> torch.Tensor:
    """(L, D) label features exactly as the service builds them (ensembled, disk-cached)."""
    return build_vocabulary(engine, label_set, templates, cache_dir).features


@dataclass
class Inputs:
    """What every model is measured on."""

    dataset: ImageFolderSet
    candidates: Candidates
    files: list[tuple[Path, int]]  # images whose expected label is a candidate
    targets: list[int]
    templates: dict[str, tuple[str, ...]]
    cache_dir: Path
    batch_size: int
    top_confusions: int


def load_model(model: str, device: str, precision: str | None = None, backend: str = "auto",
               cache_dir: Path | None = None) -> tuple[Engine, float]:
    """The service's engine for a CLIP_MODEL value, and the seconds it took.

    Raises ModelLoadError (no weights, e.g. offline) or ValueError (a name the service refuses, its
    message a sentence starting "CLIP_MODEL=<model> "). `precision` (CLIP_PRECISION, default the
    service's own) and `backend` (CLIP_BACKEND) choose the engine as the service would; OpenVINO
    keeps its converted model under `cache_dir`.
    """
    began = time.perf_counter()
    engine = load_engine(parse_model_spec(model), device, precision or "auto", backend,
                         cache_dir or DEFAULTS.cache_dir)
    return engine, time.perf_counter() - began


def unavailable_reason(model: str, error: Exception) -> str:
    if isinstance(error, (ModelLoadError, ValueError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def measure_model(engine: Engine, inputs: Inputs, load_seconds: float = 0.0) -> dict:
    """Encode every image once with a loaded engine and score it against both prompt sets."""
    model = engine.name
    names = inputs.candidates.label_set.labels
    began = time.perf_counter()
    features = {name: text_features(engine, inputs.candidates.label_set, templates, inputs.cache_dir)
                for name, templates in inputs.templates.items()}
    text_seconds = time.perf_counter() - began
    encoded = encode_folder(engine, inputs.files, inputs.targets, inputs.batch_size)
    result = {
        "model": model, "status": "ok", "framework": engine.weights_source, "device": engine.device_name,
        "backend": engine.backend, "image_dtype": engine.precision,
        "input_size": list(engine.input_size), "published_imagenet_top1": published_top1(model),
        "images_scored": int(encoded.features.shape[0]), "skipped": encoded.skipped,
        "images_per_s": encoded.images_per_s, "encode_seconds": encoded.encode_seconds,
        "decode_seconds": encoded.decode_seconds, "load_seconds": load_seconds,
        "text_seconds": text_seconds,
    }
    for name in PROMPT_SETS:
        result[name] = dict(templates=list(inputs.templates[name]),
                            **evaluate(encoded.features, encoded.targets, features[name], engine,
                                       names, inputs.top_confusions, encoded.paths))
    return result


# -------------------------------------------------------------------------------------- the output


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_report_a(report: dict) -> str:
    result = report["result"]
    lines = [f"Accuracy of {result['model']} ({result['framework']}, {result['device']}, "
             f"{result['backend']} {result['image_dtype']}) "
             f"on {report['folder']}",
             f"{result['images_scored']} images in {len(report['classes'])} classes; candidates: "
             + (f"the {report['candidates']} folder labels" if report["labels"] == "folders"
                else f"the service's {report['candidates']} labels"),
             ""]
    rows = [("prompts", "top-1", "top-5")]
    for name, title in (("ensemble", f"service ({len(result['ensemble']['templates'])} templates)"),
                        ("single", f"seed \"{result['single']['templates'][0]}\"")):
        part = result[name]
        rows.append((title, f"{percent(part['top1'])} ({part['top1_correct']}/{part['images']})",
                     f"{percent(part['top5'])} ({part['top5_correct']}/{part['images']})"))
    gain1 = 100 * (result["ensemble"]["top1"] - result["single"]["top1"])
    gain5 = 100 * (result["ensemble"]["top5"] - result["single"]["top5"])
    rows.append(("difference", f"{gain1:+.1f} points", f"{gain5:+.1f} points"))
    width = max(len(row[0]) for row in rows) + 2
    lines += [f"{a:<{width}}{b:>18}{c:>18}" for a, b, c in rows]
    if result["ensemble"]["top5_is_trivial"]:
        lines.append(f"(top-5 is trivially 100% with {report['candidates']} candidates)")
    for name, title in (("ensemble", "service prompts"), ("single", "seed prompt")):
        confusions = result[name]["confusions"]
        lines += ["", f"Costliest confusions, {title} (expected -> predicted: images):"]
        lines += [f"  {c['expected']} -> {c['predicted']}: {c['count']}" for c in confusions] or ["  none"]
    lines += _footer(report, result)
    return "\n".join(lines)


def format_report_b(report: dict) -> str:
    header = ("model", "top-1", "top-5", "top-1 seed", "images/s", "ImageNet top-1 (published)")
    rows = []
    for row in report["models"]:
        published = row.get("published_imagenet_top1")
        published = "-" if published is None else f"{published:.1f}"
        if row["status"] != "ok":
            rows.append((row["model"], f"{row['status']}: {short_reason(row['reason'])}", published))
            continue
        speed = row["images_per_s"]
        rows.append((row["model"], percent(row["ensemble"]["top1"]), percent(row["ensemble"]["top5"]),
                     percent(row["single"]["top1"]), "-" if speed is None else f"{speed:.1f}", published))
    width = max(len(header[0]), *(len(row[0]) for row in rows)) + 2
    lines = [f"Models on {report['folder']} ({report['image_files']} image files, "
             f"{len(report['classes'])} classes, "
             f"{report['candidates']} candidate labels, {report['machine']['summary']})", "",
             f"{header[0]:<{width}}{header[1]:>8}{header[2]:>8}{header[3]:>12}{header[4]:>10}  {header[5]}"]
    for row in rows:
        if len(row) == 3:
            lines.append(f"{row[0]:<{width}}{row[1]}  [published {row[2]}]")
        else:
            lines.append(f"{row[0]:<{width}}{row[1]:>8}{row[2]:>8}{row[3]:>12}{row[4]:>10}  {row[5]}")
    lines.append("")
    lines.append("top-1/top-5: the service's prompt ensemble; top-1 seed: the single prompt "
                 f"\"{SEED_PROMPT}\"; images/s: image encoding only, batches of {report['batch_size']}, "
                 "after a warm-up batch.")
    lines += _footer(report, None)
    return "\n".join(lines)


def _footer(report: dict, result: dict | None) -> list[str]:
    lines = []
    if report["missing_labels"]:
        lines += ["", f"Not in the vocabulary, excluded ({report['excluded_images']} images): "
                  + ", ".join(report["missing_labels"])]
    skipped = result["skipped"] if result else next(
        (row["skipped"] for row in report["models"] if row["status"] == "ok"), [])
    if skipped:
        lines += ["", f"Skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]['path']}: "
                  f"{skipped[0]['reason']}"]
    if result and result.get("images_per_s"):
        lines += ["", f"Image encoding: {result['images_per_s']:.1f} images/s "
                  f"(batches of {report['batch_size']}, {report['machine']['summary']})"]
    return lines


def machine_info() -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    info["summary"] = info["cuda"] or f"{info['cpus']} CPUs, {info['torch_threads']} torch threads"
    return info


# --------------------------------------------------------------------------------------- the command


EPILOG = """\
examples:
  bench/accuracy.py ~/photos-by-label                                # report A, ViT-B/32
  bench/accuracy.py ~/photos-by-label --labels all --json a.json     # against all 2,064 labels
  bench/accuracy.py ~/photos-by-label --compare ViT-B/32 ViT-B-16-SigLIP:webli MobileCLIP-S2:datacompdr

exit status: 0 done; 1 no image could be scored, or the model (report A) or every model (report B)
could not be loaded; 2 bad arguments. Offline, set HF_HUB_OFFLINE=1 so a missing model fails at once
instead of retrying the hub. See bench/ACCURACY.md."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("folder", type=Path, help="ImageFolder layout: FOLDER/<label>/<images>")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help=f"the CLIP_MODEL for report A (default {DEFAULTS.clip_model})")
    which.add_argument("--compare", nargs="+", metavar="MODEL",
                       help="report B: accuracy (prompt ensemble) and images/s of each model, e.g. "
                            "ViT-B/32 ViT-B-16-SigLIP:webli MobileCLIP-S2:datacompdr")
    parser.add_argument("--labels", choices=("folders", "all"), default="folders",
                        help="candidate labels: the sub-folder names (default) or the service's whole "
                             "vocabulary (an expected label missing from it is reported and excluded)")
    parser.add_argument("--labels-dir", type=Path, default=DEFAULTS.labels_dir,
                        help="the vocabulary for --labels all (default: labels/)")
    parser.add_argument("--prompts", type=Path, default=DEFAULTS.prompts_file,
                        help="the service's prompt templates (default: prompts/ensemble.txt)")
    parser.add_argument("--baseline-prompt", default=SEED_PROMPT,
                        help=f"the single prompt compared with the ensemble (default: \"{SEED_PROMPT}\")")
    parser.add_argument("--device", default=DEFAULTS.device,
                        help="auto (default), cpu, cuda, cuda:N or mps, as CLIP_DEVICE")
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16", "int8"),
                        help="as CLIP_PRECISION (default: the service's default for the device)")
    parser.add_argument("--backend", choices=("auto", "torch", "openvino"), default="auto",
                        help="as CLIP_BACKEND (default auto: OpenVINO on a CPU where installed)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--top", type=int, default=10, help="confusion pairs shown (default 10)")
    parser.add_argument("--per-class", type=int, default=0, metavar="N",
                        help="use at most N images per class (default: all)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULTS.cache_dir,
                        help="label-feature cache, shared with the service (default ~/.cache/clip-service)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every number here")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr, warnings only")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    if args.baseline_prompt.count("{}") != 1:
        parser.error("--baseline-prompt needs exactly one {} where the label goes")
    if args.batch_size < 1 or args.top < 0 or args.per_class < 0:
        parser.error("--batch-size must be 1 or more; --top and --per-class 0 or more")
    return args


def prepare_inputs(args: argparse.Namespace) -> Inputs:
    dataset = scan_image_folder(args.folder, args.per_class)
    if not dataset.classes:
        raise LabelsError(f"{args.folder} has no sub-folders; expected FOLDER/<label>/<images>")
    candidates = resolve_candidates(dataset, args.labels, args.labels_dir)
    if candidates.missing:
        log.warning("Not in the vocabulary (%s), excluded: %s", args.labels_dir,
                    ", ".join(candidates.missing))
    files, targets = [], []
    for path, cls in dataset.files:
        target = candidates.class_target[cls]
        if target is not None:
            files.append((path, cls))
            targets.append(target)
    templates = {"ensemble": load_templates(args.prompts), "single": (args.baseline_prompt,)}
    return Inputs(dataset, candidates, files, targets, templates, args.cache_dir, args.batch_size, args.top)


def base_report(args: argparse.Namespace, inputs: Inputs, kind: str) -> dict:
    dataset, candidates = inputs.dataset, inputs.candidates
    return {
        "report": kind,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "folder": str(args.folder),
        "labels": args.labels,
        "labels_dir": str(args.labels_dir) if args.labels == "all" else None,
        "prompts_file": str(args.prompts),
        "candidates": len(candidates.label_set),
        "classes": [{"folder": folder, "label": label, "image_files": dataset.count(index),
                     "candidate": candidates.class_target[index] is not None}
                    for index, (folder, label) in enumerate(dataset.classes)],
        "image_files": len(inputs.files),  # with an image extension and a candidate label
        "ignored_files": len(dataset.ignored),
        "missing_labels": candidates.missing,
        "excluded_images": len(dataset.files) - len(inputs.files),
        "batch_size": args.batch_size,
        "machine": machine_info(),
    }


def write_json(path: Path | None, report: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:  # progress on stderr; open_clip's own chatter stays quiet
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="[%(asctime)s] %(message)s",
                            datefmt="%H:%M:%S")
    loggers = [logging.getLogger(name) for name in (log.name, "clip_service")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return run(args)
    finally:  # main() may run inside another program (the tests): leave its logging as it was
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def run(args: argparse.Namespace) -> int:
    try:
        inputs = prepare_inputs(args)
    except LabelsError as error:  # no classes, no vocabulary, a bad template file
        print(f"accuracy: {error}", file=sys.stderr)
        return 2
    if args.compare:
        report = base_report(args, inputs, "compare")
        report["models"] = [compare_one(model, args.device, inputs, args.precision, args.backend)
                            for model in args.compare]
        write_json(args.json, report)
        print(format_report_b(report))
        return 0 if any(row["status"] == "ok" and row["images_scored"] for row in report["models"]) else 1
    report = base_report(args, inputs, "prompts")
    model = args.model or DEFAULTS.clip_model
    try:
        engine, load_seconds = load_model(model, args.device, args.precision, args.backend, args.cache_dir)
    except (ModelLoadError, ValueError) as error:
        print(f"accuracy: {unavailable_reason(model, error)}", file=sys.stderr)
        return 1
    report["result"] = measure_model(engine, inputs, load_seconds)
    write_json(args.json, report)
    print(format_report_a(report))
    return 0 if report["result"]["images_scored"] else 1


def compare_one(model: str, device: str, inputs: Inputs, precision: str | None = None,
                backend: str = "auto") -> dict:
    """One row of report B; a model that cannot be loaded or measured is a row too, never a crash."""
    published = published_top1(model)
    try:
        engine, load_seconds = load_model(model, device, precision, backend, inputs.cache_dir)
    except Exception as error:  # no weights offline, an unknown name, no such device: the next model
        reason = unavailable_reason(model, error)
        log.warning("%s is unavailable: %s", model, short_reason(reason, 300))
        return {"model": model, "status": "unavailable", "reason": reason,
                "published_imagenet_top1": published}
    try:
        return measure_model(engine, inputs, load_seconds)
    except Exception as error:  # e.g. out of GPU memory on a large model: report it, go on
        log.exception("%s failed while measuring", model)
        return {"model": model, "status": "failed", "reason": f"{type(error).__name__}: {error}",
                "published_imagenet_top1": published}
    finally:  # free the model before the next one loads
        on_cuda = engine.device_kind == "cuda"
        del engine
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

if __name__ == "__main__":
    sys.exit(main())
