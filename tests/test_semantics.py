"""The right label wins, without a server: the scoring rule, the tagger and bench/accuracy.py.

On the model of tests/support/trained_clip.py, which names the colour of unseen pictures 99 % of the time.
The server's paths are held to the same answers in test_semantic_serving.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import open_clip
import pytest
import torch

from bench import accuracy
from clip_service.engines.registry import load_engine
from clip_service.engines.spec import parse_model_spec
from clip_service.inputs.images import ImageLimits, decode_image
from clip_service.tasks.classify import Classifier
from clip_service.vocabulary.features import build_vocabulary
from clip_service.vocabulary.labels import LabelSet, load_templates
from tests.support.server import clean_environment
from tests.support.trained_clip import (
    COLOURS,
    UNTRAINED_COLOURS,
    assert_mostly_named,
    unseen_pictures,
    write_labels,
    write_pictures,
)

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = load_templates(ROOT / "prompts" / "ensemble.txt")


class NoEmoji:
    def emoji_for(self, label: str) -> None:
        return None


@pytest.fixture(scope="module")
def engine(trained_model_dir):
    return load_engine(parse_model_spec(f"local-dir:{trained_model_dir}"), "cpu", "fp32")


@pytest.fixture(scope="module")
def colour_classifier(engine, tmp_path_factory) -> Classifier:
    """The service's classifier with every colour as a label, under the service's prompt ensemble."""
    cache = tmp_path_factory.mktemp("cache")
    vocabulary = build_vocabulary(engine, LabelSet(tuple(COLOURS)), TEMPLATES, cache)
    return Classifier(engine, vocabulary, NoEmoji())


@pytest.mark.parametrize("size", [64, 300])
def test_the_trained_model_names_the_colour_of_unseen_pictures(colour_classifier, size):
    pictures = unseen_pictures(COLOURS, 10, size=size, first_seed=70_000)
    assert_mostly_named((colour, colour_classifier.classify(picture, 0.0, 1)[0].label)
                        for colour, _, picture in pictures)


def test_confidences_follow_the_zero_shot_rule_computed_with_open_clip(trained_model_dir, colour_classifier):
    """The service's confidences equal CLIP's rule written out with open_clip alone: each label's
    feature the normalised mean of its unit features under every template, cosine similarity with the
    unit image feature times the logit scale, softmax over the labels."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{trained_model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{trained_model_dir}")
    model.eval()
    names = list(COLOURS)
    with torch.no_grad():
        per_template = torch.stack([
            torch.nn.functional.normalize(model.encode_text(tokenizer([t.format(n) for n in names])), dim=-1)
            for t in TEMPLATES])  # (templates, labels, D)
        label_features = torch.nn.functional.normalize(per_template.mean(dim=0), dim=-1)  # (labels, D)
        pictures = unseen_pictures(COLOURS, 2, size=96, first_seed=71_000)
        images = torch.stack([preprocess(picture) for _, _, picture in pictures])  # (N, 3, 64, 64)
        image_features = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        expected = (model.logit_scale.exp() * image_features @ label_features.T).softmax(dim=-1)
    for (_, _, picture), row in zip(pictures, expected, strict=True):
        answer = {p.label: p.confidence for p in colour_classifier.classify(picture, 0.0, len(names))}
        assert answer == pytest.approx(dict(zip(names, row.tolist(), strict=True)), abs=2e-3)
    assert_mostly_named((colour, names[int(row.argmax())]) for (colour, _, _), row in zip(
        pictures, expected, strict=True))


def test_the_tagger_names_each_picture_by_its_colour(trained_model_dir, tmp_path):
    """`python -m clip_service tag` over a folder of mixed colours, in batches of 8."""
    folder = tmp_path / "pictures"
    written = write_pictures(folder, COLOURS, 3, first_seed=72_000)
    write_pictures(folder / "jpeg", COLOURS, 1, size=400, first_seed=73_000, fmt="JPEG")
    labels = write_labels(tmp_path / "labels", {"colours": COLOURS})
    env = clean_environment({
        "CLIP_MODEL": f"local-dir:{trained_model_dir}", "CLIP_LABELS_DIR": str(labels),
        "CLIP_CACHE_DIR": str(tmp_path / "cache"), "API_PORT": "9", "API_TIMEOUT": "0.2",
        "CLIP_DEVICE": "cpu", "PYTHONPATH": str(ROOT)})
    done = subprocess.run([sys.executable, "-m", "clip_service", "tag", str(folder), "-o", "tags.jsonl",
                           "--batch-size", "8"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (tmp_path / "tags.jsonl").read_text().splitlines()]
    assert len(records) == len(written) + len(COLOURS)
    # the folder a picture lies in is its colour: <colour>/n.png or jpeg/<colour>/n.jpg
    assert_mostly_named((Path(record["path"]).parent.name, record["labels"][0]) for record in records)


@pytest.fixture(scope="module")
def accuracy_folder(tmp_path_factory) -> Path:
    """Five pictures of each learned colour and five of brown, a colour the model never learned."""
    folder = tmp_path_factory.mktemp("accuracy")
    write_pictures(folder, [*COLOURS, *UNTRAINED_COLOURS], 5, first_seed=74_000)
    return folder


def test_accuracy_tool_reports_high_top1_and_the_confusions_the_model_really_has(
        accuracy_folder, trained_model_dir, engine, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert accuracy.main([str(accuracy_folder), "--model", f"local-dir:{trained_model_dir}",
                          "--device", "cpu", "--precision", "fp32", "--json", str(out),
                          "--cache-dir", str(tmp_path / "cache"), "--top", "100", "--quiet"]) == 0
    result = json.loads(out.read_text())["result"]
    names = sorted([*COLOURS, *UNTRAINED_COLOURS])
    limits = ImageLimits(8 << 20, 60_000_000)
    for prompt_set in ("ensemble", "single"):
        part = result[prompt_set]
        # Learned colours: named right; brown: no picture can be, the model never saw the word.
        learned = [row for label, row in part["per_class"].items() if label in COLOURS]
        right = sum(row["top1_correct"] for row in learned)
        assert right >= 0.9 * sum(row["images"] for row in learned), part["per_class"]
        assert part["top1"] >= 0.8  # 40 of 45 pictures at most wrong: the 5 brown ones
        # The confusions are the model's own: the service's classifier, picture by picture, makes
        # exactly these mistakes with the same templates.
        vocabulary = build_vocabulary(engine, LabelSet(tuple(names)), tuple(part["templates"]),
                                      tmp_path / "cache")
        classifier = Classifier(engine, vocabulary, NoEmoji())
        mistakes = Counter()
        for path in sorted(accuracy_folder.glob("*/*.png")):
            image = decode_image(path.read_bytes(), limits, engine.input_size)
            predicted = classifier.classify(image, 0.0, 1)[0].label
            if predicted != path.parent.name:
                mistakes[(path.parent.name, predicted)] += 1
        reported = {(pair["expected"], pair["predicted"]): pair["count"] for pair in part["confusions"]}
        assert reported == dict(mistakes)
        assert sum(reported.values()) == part["errors"] >= 1
        assert {expected for expected, _ in reported} >= set(UNTRAINED_COLOURS)
    assert "Costliest confusions" in capsys.readouterr().out
