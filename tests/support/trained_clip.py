"""A tiny open_clip CLIP trained, with fixed seeds, to name the colour of a shape on a noisy background.

The random test model (models.py) proves plumbing, but any label can win on it. This one knows
something: after 300 steps of contrastive training on synthetic pictures ("a photo of a red circle",
"itap of a red.") it names the colour of pictures it has never seen 99 % of the time among 8 colours,
so tests can assert that the RIGHT label wins on every path of the service. It is saved in
open_clip's `local-dir:` layout and loaded by the real code like any other model. It does not learn
the shapes (they stay at chance); tests assert colours only.

Training takes about 20 s of one CPU core. It is cached by a hash of this file and the versions of
the libraries that train, so a test session trains at most once and later sessions reuse it:

    .venv/bin/python -m tests.support.trained_clip OUT_DIR     # train into OUT_DIR, print its accuracy
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

# Base RGB of each colour; pictures jitter them. Purple is learned but left out of the first label
# files in the reload tests, so that adding it is visible.
COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (240, 220, 40),
    "green": (40, 165, 55),
    "cyan": (40, 200, 210),
    "blue": (40, 70, 215),
    "purple": (135, 50, 185),
    "pink": (245, 135, 195),
}
# Drawn but never trained on: the model cannot name it, so tests that need real mistakes use it.
UNTRAINED_COLOURS = {"brown": (125, 80, 40)}
SHAPES = ("circle", "square", "triangle")

IMAGE_SIZE = 64
CONTEXT = 16  # tokens; the longest caption has 12
MODEL_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PREPROCESS_CONFIG = {
    "size": IMAGE_SIZE,
    "mode": "RGB",
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
SEED = 0
STEPS = 300
BATCH = 64
LEARNING_RATE = 2e-3

# Captions: a colour and a shape through varied sentences, and a colour alone (that is what a label
# file of colours asks), including the service's prompt ensemble and the seed's "a picture of a {}".
OBJECT_TEMPLATES = (
    "a photo of a {c} {s}.", "a {c} {s}", "a picture of a {c} {s}", "a {s} that is {c}",
    "a drawing of a {c} {s}.", "a {c} {s} on a grey background", "itap of a {c} {s}.",
    "a close-up photo of the {c} {s}.",
)
COLOUR_TEMPLATES = (
    "{c}", "a photo of a {c}.", "itap of a {c}.", "a bad photo of the {c}.", "a origami {c}.",
    "a photo of the large {c}.", "a {c} in a video game.", "art of the {c}.", "a photo of the small {c}.",
    "a picture of a {c}", "something {c}", "the colour {c}",
)
SHAPE_TEMPLATES = ("a photo of a {s}.", "a {s}", "a picture of a {s}", "a {s} shape")

SOURCE = Path(__file__).resolve()


def training_key() -> str:
    """Changes whenever the trained weights could: this file's text and the libraries that train."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(f"torch {torch.__version__} open_clip {open_clip.__version__} numpy {np.__version__}"
                  .encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------- pictures


def draw_picture(colour: str, shape: str, size: int = IMAGE_SIZE, seed: int = 0,
                 rng: np.random.Generator | None = None) -> Image.Image:
    """A `colour` `shape` on a noisy grey background: an RGB image `size` pixels square.

    The same seed draws the same picture. Training draws from its own generator (`rng`), so pictures
    drawn by seed are ones it has never seen.
    """
    rng = rng or np.random.default_rng([seed, 7919])
    base = np.array({**COLOURS, **UNTRAINED_COLOURS}[colour], dtype=np.float32)
    fill = base * rng.uniform(0.85, 1.1) + rng.normal(0, 12, 3)
    grey, tint, slope = rng.uniform(45, 215), rng.normal(0, 10, 3), rng.normal(0, 30, 2)
    radius = rng.uniform(0.18, 0.34)
    cx, cy = rng.uniform(0.5 - (0.5 - radius) * 0.6, 0.5 + (0.5 - radius) * 0.6, 2)
    x, y = _grid(size)
    background = (grey + slope[0] * (x - 0.5) + slope[1] * (y - 0.5))[..., None] + tint  # (size, size, 3)
    pixels = np.where(_shape_mask(shape, x - cx, y - cy, radius)[..., None], fill, background)
    pixels += rng.standard_normal((size, size, 3), dtype=np.float32) * rng.uniform(2, 20)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel x and y coordinates in [0, 1), each (size, size) float32."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return x, y


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = radius * 0.85
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # pointing up: apex at the top, base at the bottom
        top, bottom = -radius, radius * 0.8
        half_width = (dy - top) / (bottom - top) * radius * 1.1
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def unseen_pictures(colours: Iterable[str], per_colour: int, size: int = 96, first_seed: int = 10_000,
                    ) -> list[tuple[str, str, Image.Image]]:
    """(colour, shape, picture) for `per_colour` pictures of each colour, shapes in turn.

    Different `first_seed`s 1,000 or more apart give different pictures; none is a training picture.
    """
    if per_colour > 100:
        raise ValueError("per_colour is at most 100: the next colour's seeds start 100 further on")
    return [(colour, SHAPES[n % len(SHAPES)],
             draw_picture(colour, SHAPES[n % len(SHAPES)], size, seed=first_seed + 100 * c_index + n))
            for c_index, colour in enumerate(colours) for n in range(per_colour)]


def write_pictures(folder: Path, colours: Iterable[str], per_colour: int, size: int = 96,
                   first_seed: int = 10_000, fmt: str = "PNG") -> list[tuple[Path, str]]:
    """Unseen pictures saved as folder/<colour>/<n>.<png|jpg>, the layout bench/accuracy.py reads.

    Returns (path, colour) for each, in writing order.
    """
    written = []
    counters: dict[str, int] = {}
    for colour, _, picture in unseen_pictures(colours, per_colour, size, first_seed):
        (folder / colour).mkdir(parents=True, exist_ok=True)
        number = counters[colour] = counters.get(colour, -1) + 1
        path = folder / colour / f"{number}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        picture.save(path, fmt)
        written.append((path, colour))
    return written


def write_labels(folder: Path, groups: dict[str, Iterable[str]]) -> Path:
    """Label files folder/<group>.txt, one label a line."""
    folder.mkdir(parents=True, exist_ok=True)
    for group, labels in groups.items():
        (folder / f"{group}.txt").write_text("\n".join(labels) + "\n")
    return folder


def assert_mostly_named(expected_and_named: Iterable[tuple[str, str]], at_least: float = 0.9) -> int:
    """Fail unless `at_least` of the (expected, named) pairs match; returns how many matched.

    The model names 99 % of unseen pictures' colours right (`python -m tests.support.trained_clip`
    measures it), so 0.9 leaves an honest margin, and a bug that scrambles labels (right about 1 in 8) fails.
    """
    pairs = list(expected_and_named)
    assert pairs, "nothing was named"
    right = sum(expected == named for expected, named in pairs)
    wrong = [f"{expected} named {named}" for expected, named in pairs if expected != named]
    assert right >= at_least * len(pairs), f"{right} of {len(pairs)} right; wrong: {wrong}"
    return right


# ----------------------------------------------------------------------------------------- training


def _captions() -> list[tuple[str, str | None, str | None]]:
    """Every caption with its colour and shape (None where the caption does not name it)."""
    captions = [(t.format(c=c, s=s), c, s) for t in OBJECT_TEMPLATES for c in COLOURS for s in SHAPES]
    captions += [(t.format(c=c), c, None) for t in COLOUR_TEMPLATES for c in COLOURS]
    captions += [(t.format(s=s), None, s) for t in SHAPE_TEMPLATES for s in SHAPES]
    return captions


def _normalise(pictures: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float normalised as open_clip's transform does."""
    mean = torch.tensor(PREPROCESS_CONFIG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CONFIG["std"]).view(1, 3, 1, 1)
    return (torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 255 - mean) / std


def train(steps: int = STEPS, seed: int = SEED) -> open_clip.CLIP:
    """Train the model from seeded initial weights; the caller's RNG state and threads are left alone.

    One thread: these matrices are too small to share out, and two threads on a busy 2-core machine
    took five times as long (and one thread gives the same weights whatever the core count).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(steps: int, seed: int) -> open_clip.CLIP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.CLIP(**MODEL_CONFIG)
        tokenizer = open_clip.tokenize
        captions = _captions()
        by_colour_shape = {}
        for index, (_, colour, shape) in enumerate(captions):
            by_colour_shape.setdefault((colour, shape), []).append(index)
        tokens = tokenizer([text for text, _, _ in captions], context_length=CONTEXT)  # (C, CONTEXT)
        loss_fn = open_clip.ClipLoss()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=steps,
                                                       pct_start=0.1)
        rng = np.random.default_rng([seed, 1])  # never the stream draw_picture uses for test seeds
        colours, shapes = list(COLOURS), list(SHAPES)
        model.train()
        for _ in range(steps):
            pictures, chosen = [], []
            for _ in range(BATCH):
                colour, shape = colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]
                pictures.append(np.asarray(draw_picture(colour, shape, rng=rng)))
                kind = rng.choice(3, p=(0.5, 0.4, 0.1))  # object, colour alone, shape alone
                key = [(colour, shape), (colour, None), (None, shape)][kind]
                options = by_colour_shape[key]
                chosen.append(options[rng.integers(len(options))])
            images = _normalise(np.stack(pictures))
            image_features, text_features, logit_scale = model(images, tokens[chosen])
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        return model.eval()


def save_model(model: open_clip.CLIP, folder: Path) -> Path:
    """open_clip_config.json + open_clip_model.safetensors, the `local-dir:` layout."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": MODEL_CONFIG, "preprocess_cfg": PREPROCESS_CONFIG}, indent=1))
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def trained_model(cache_root: Path) -> Path:
    """The trained model's folder under cache_root, training it first if this key has none.

    Written into a temporary folder and renamed into place, so an interrupted run or a second
    process never sees half a model.
    """
    cache_root = Path(cache_root)
    folder = cache_root / f"trained-clip-{training_key()}"
    if (folder / "open_clip_model.safetensors").is_file():
        return folder
    cache_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".training-", dir=cache_root))
    for stale in cache_root.glob("trained-clip-*"):  # trained by an older version of this file
        shutil.rmtree(stale, ignore_errors=True)
    try:
        save_model(train(), scratch)
        try:
            os.rename(scratch, folder)
        except OSError:  # another process finished first; its model is the same
            if not (folder / "open_clip_model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def unseen_accuracy(model: open_clip.CLIP, per_pair: int = 8) -> dict[str, float]:
    """Top-1 on unseen pictures of every colour and shape: colour among the colours, shape among the
    shapes, each with the plain prompt "a photo of a {}."."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    with torch.no_grad():
        pictures = np.stack([np.asarray(draw_picture(c, s, seed=50_000 + 100 * i + n))
                             for i, (c, s) in enumerate(pairs) for n in range(per_pair)])
        image = torch.nn.functional.normalize(model.encode_image(_normalise(pictures)), dim=-1)
        result = {}
        for name, names, truth in (("colour", list(COLOURS), [c for c, _ in pairs]),
                                   ("shape", list(SHAPES), [s for _, s in pairs])):
            texts = open_clip.tokenize([f"a photo of a {n}." for n in names], context_length=CONTEXT)
            text = torch.nn.functional.normalize(model.encode_text(texts), dim=-1)
            predicted = (image @ text.T).argmax(dim=1).tolist()
            expected = [names.index(t) for t in truth for _ in range(per_pair)]
            result[name] = sum(p == e for p, e in zip(predicted, expected, strict=True)) / len(expected)
    return result


if __name__ == "__main__":
    import sys

    started = time.perf_counter()
    trained = train()
    seconds = time.perf_counter() - started
    scores = unseen_accuracy(trained)
    print(f"trained in {seconds:.1f} s; top-1 on unseen pictures: colour {scores['colour']:.3f} among "
          f"{len(COLOURS)}, shape {scores['shape']:.3f} among {len(SHAPES)}")
    print(save_model(trained, Path(sys.argv[1])))
