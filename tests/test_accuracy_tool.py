"""bench/accuracy.py: the arithmetic on hand-made cases, and the plumbing end to end on the tiny model.

The tiny model is random: these tests check counts, structure and consistency, never accuracy.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import accuracy
from clip_service.engines.spec import parse_model_spec
from clip_service.inputs.images import ImageLimits, decode_image
from clip_service.tasks.classify import Classifier
from clip_service.vocabulary.features import build_vocabulary
from clip_service.vocabulary.labels import LabelSet, load_templates

ROOT = Path(__file__).resolve().parent.parent

CLASSES = ("cat", "dog", "car")
PER_CLASS = 3


# ------------------------------------------------------------------------------------ the arithmetic


def test_topk_accuracy_on_a_hand_made_case():
    probabilities = torch.tensor([
        [0.50, 0.20, 0.10, 0.08, 0.07, 0.05],  # target 0: rank 1
        [0.05, 0.07, 0.08, 0.10, 0.20, 0.50],  # target 4: rank 2
        [0.30, 0.25, 0.20, 0.12, 0.08, 0.05],  # target 4: rank 5
        [0.30, 0.25, 0.20, 0.12, 0.08, 0.05],  # target 5: rank 6
    ])
    targets = torch.tensor([0, 4, 4, 5])
    assert accuracy.topk_correct(probabilities, targets, 1) == 1
    assert accuracy.topk_accuracy(probabilities, targets, 1) == pytest.approx(0.25)
    assert accuracy.topk_accuracy(probabilities, targets, 2) == pytest.approx(0.50)
    assert accuracy.topk_accuracy(probabilities, targets, 4) == pytest.approx(0.50)
    assert accuracy.topk_accuracy(probabilities, targets, 5) == pytest.approx(0.75)
    assert accuracy.topk_accuracy(probabilities, targets, 6) == pytest.approx(1.0)


def test_target_ranks_and_ties_in_the_targets_favour():
    probabilities = torch.tensor([[0.1, 0.6, 0.3], [0.4, 0.4, 0.2], [0.2, 0.3, 0.5]])
    assert accuracy.target_ranks(probabilities, torch.tensor([2, 1, 0])).tolist() == [2, 1, 3]


def test_topk_beyond_the_candidates_counts_every_row_and_no_rows_is_zero():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]])
    assert accuracy.topk_accuracy(probabilities, torch.tensor([2, 0]), 5) == 1.0
    assert accuracy.topk_accuracy(probabilities, torch.tensor([2, 0]), 1) == 0.0
    assert accuracy.topk_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 1) == 0.0


def test_confusion_pairs_most_frequent_first_ties_by_name_correct_ones_left_out():
    names = ["bird", "cat", "dog", "fox"]
    # cat->dog x3, fox->cat x2, dog->cat x2, bird->fox x1, and four correct answers
    targets = [1, 1, 1, 3, 3, 2, 2, 0, 0, 1, 2, 3]
    predicted = [2, 2, 2, 1, 1, 1, 1, 3, 0, 1, 2, 3]
    assert accuracy.confusion_pairs(predicted, targets, names, 10) == [
        ("cat", "dog", 3), ("dog", "cat", 2), ("fox", "cat", 2), ("bird", "fox", 1)]
    assert accuracy.confusion_pairs(predicted, targets, names, 2) == [("cat", "dog", 3), ("dog", "cat", 2)]
    assert accuracy.confusion_pairs(predicted, targets, names, 0) == []
    assert accuracy.confusion_pairs([0, 1], [0, 1], names, 5) == []
    errors = sum(p != t for p, t in zip(predicted, targets, strict=True))
    assert sum(n for *_, n in accuracy.confusion_pairs(predicted, targets, names, 10)) == errors


def test_per_class_top1():
    table = accuracy.per_class_top1([0, 1, 1, 2], [0, 0, 1, 2], ["a", "b", "c", "unused"])
    assert table == {"a": {"images": 2, "top1_correct": 1, "top1": 0.5},
                     "b": {"images": 1, "top1_correct": 1, "top1": 1.0},
                     "c": {"images": 1, "top1_correct": 1, "top1": 1.0}}


def test_folder_names_read_as_labels_and_published_numbers():
    assert accuracy.folder_label("sports_car") == "sports car"
    assert accuracy.folder_label(" hot__dog ") == "hot dog"
    assert accuracy.published_top1("ViT-B-32:openai") == accuracy.PUBLISHED["ViT-B/32"]
    assert accuracy.published_top1("ViT-L-14:openai") == accuracy.PUBLISHED["ViT-L/14"]
    assert accuracy.published_top1("local-dir:/x") is None
    for name in accuracy.PUBLISHED:  # every published name is one the service accepts
        parse_model_spec(name)


def test_published_numbers_agree_with_the_documents_that_quote_them():
    """bench/ACCURACY.md's table and the README's rough guide quote PUBLISHED; a typo in any shows."""
    document = (ROOT / "bench" / "ACCURACY.md").read_text()
    table = dict(re.findall(r"(?m)^\| `([^`]+)` \| (\d+\.\d) \|", document))
    assert {name: float(top1) for name, top1 in table.items()} == accuracy.PUBLISHED
    guide = re.search(r"Rough guide \(ImageNet zero-shot top-1, published\): ([^.]+\.\d[^.]*\.\d[^.]*\.\d)",
                      (ROOT / "README.md").read_text())
    assert guide, "the README's rough guide of published accuracies is missing"
    quoted = dict(re.findall(r"(ViT-[BL]/\d+) (\d+\.\d)", guide[1]))
    assert len(quoted) == 3
    assert {name: float(top1) for name, top1 in quoted.items()} == {
        name: accuracy.PUBLISHED[name] for name in quoted}


def test_scan_and_candidates_without_a_model(tmp_path, labels_dir):
    for folder in ("cat", "sports_car", ".hidden"):
        (tmp_path / folder).mkdir()
    for name in ("b.jpg", "a.PNG", "notes.txt", ".DS_Store"):
        (tmp_path / "cat" / name).write_bytes(b"x")
    (tmp_path / "sports_car" / "deep").mkdir()
    (tmp_path / "sports_car" / "deep" / "c.webp").write_bytes(b"x")
    (tmp_path / "loose.jpg").write_bytes(b"x")
    dataset = accuracy.scan_image_folder(tmp_path)
    assert dataset.classes == [("cat", "cat"), ("sports_car", "sports car")]
    assert [(path.name, cls) for path, cls in dataset.files] == [("a.PNG", 0), ("b.jpg", 0), ("c.webp", 1)]
    assert sorted(path.name for path in dataset.ignored) == ["loose.jpg", "notes.txt"]
    assert len(accuracy.scan_image_folder(tmp_path, per_class=1).files) == 2

    folders = accuracy.resolve_candidates(dataset, "folders", labels_dir)
    assert folders.label_set.labels == ("cat", "sports car") and folders.class_target == [0, 1]
    everything = accuracy.resolve_candidates(dataset, "all", labels_dir)
    assert everything.missing == ["sports car"] and everything.class_target[1] is None
    assert everything.label_set.labels[everything.class_target[0]] == "cat"


# -------------------------------------------------------------------------------------- end to end


def _photo(kind: str, variant: int) -> Image.Image:
    import skimage.data

    source = {"cat": skimage.data.chelsea, "dog": skimage.data.astronaut, "car": skimage.data.coffee}[kind]()
    image = Image.fromarray(np.ascontiguousarray(source)).resize((120, 90))
    image = image.crop((variant * 8, 0, 120 - variant * 4, 90))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if variant % 2 else image


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """3 classes x 3 photos (JPEG and PNG), one broken 'photo' and one non-image file."""
    root = tmp_path_factory.mktemp("imagefolder")
    for kind in CLASSES:
        (root / kind).mkdir()
        for variant in range(PER_CLASS):
            _photo(kind, variant).save(root / kind / f"{kind}{variant}.{'png' if variant == 2 else 'jpg'}")
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    (root / "dog" / "README.txt").write_text("not an image")
    return root


def _check_prompt_set(part: dict, images: int, candidates: int, names: set[str]) -> None:
    assert part["images"] == images and part["candidates"] == candidates
    for k in (1, 5):
        assert 0 <= part[f"top{k}_correct"] <= images
        assert 0.0 <= part[f"top{k}"] <= 1.0
        assert part[f"top{k}"] == pytest.approx(part[f"top{k}_correct"] / images)
    assert part["top1_correct"] <= part["top5_correct"]
    assert part["errors"] == images - part["top1_correct"]
    assert sum(pair["count"] for pair in part["confusions"]) <= part["errors"]
    counts = [pair["count"] for pair in part["confusions"]]
    assert counts == sorted(counts, reverse=True)
    for pair in part["confusions"]:
        assert pair["expected"] != pair["predicted"] and pair["expected"] in names
    assert len(part["mistakes"]) == part["errors"]
    assert sum(row["images"] for row in part["per_class"].values()) == images
    assert sum(row["top1_correct"] for row in part["per_class"].values()) == part["top1_correct"]


def test_report_a_on_the_folder_labels(image_folder, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "a.json"
    level = logging.getLogger("clip_service").level
    code = accuracy.main([str(image_folder), "--model", f"local-dir:{tiny_model_dir}", "--json", str(out),
                          "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert code == 0
    assert logging.getLogger("clip_service").level == level  # the caller's logging is left alone
    report = json.loads(out.read_text())
    result = report["result"]
    assert report["labels"] == "folders" and report["candidates"] == 3
    assert [c["label"] for c in report["classes"]] == sorted(CLASSES)
    assert report["image_files"] == 3 * PER_CLASS + 1 and report["ignored_files"] == 1
    assert result["status"] == "ok" and result["images_scored"] == 3 * PER_CLASS
    assert [Path(s["path"]).name for s in result["skipped"]] == ["broken.jpg"]
    assert result["images_per_s"] > 0
    assert result["ensemble"]["templates"] == list(load_templates(ROOT / "prompts" / "ensemble.txt"))
    assert result["single"]["templates"] == ["a picture of a {}"]
    for name in ("ensemble", "single"):
        part = result[name]
        _check_prompt_set(part, 3 * PER_CLASS, 3, set(CLASSES))
        assert part["top5_correct"] == 3 * PER_CLASS and part["top5_is_trivial"]  # 3 candidates
        # --top 10 covers all 6 possible pairs of 3 classes: the pairs account for every error
        assert sum(pair["count"] for pair in part["confusions"]) == part["errors"]
    text = capsys.readouterr().out
    assert "service (8 templates)" in text and 'seed "a picture of a {}"' in text
    assert "Costliest confusions" in text and "broken.jpg" in text


def test_report_a_counts_what_the_service_answers(image_folder, tiny_model_dir, tiny_engine, tmp_path):
    """Each prompt set's answers are the service's own Classifier's, image by image.

    The tool encodes in batches; the service one image at a time. In reduced precision (bf16 on a CPU
    with AMX) the two may differ in the last digits, so confidences match to 0.003 and a near tie is
    not held to the same top-1.
    """
    out = tmp_path / "a.json"
    assert accuracy.main([str(image_folder), "--model", f"local-dir:{tiny_model_dir}", "--json", str(out),
                          "--cache-dir", str(tmp_path / "cache"), "--quiet", "--batch-size", "4",
                          "--backend", "torch"]) == 0  # tiny_engine's
    result = json.loads(out.read_text())["result"]
    engine = tiny_engine
    no_emoji = type("NoEmoji", (), {"emoji_for": lambda self, label: None})()
    limits = ImageLimits(8 << 20, 60_000_000)
    compared = 0
    for name in ("ensemble", "single"):
        vocabulary = build_vocabulary(engine, LabelSet(tuple(sorted(CLASSES))),
                                      tuple(result[name]["templates"]), tmp_path / "cache")
        classifier = Classifier(engine, vocabulary, no_emoji)
        mistakes = {mistake["path"]: mistake for mistake in result[name]["mistakes"]}
        for kind in CLASSES:
            for path in sorted((image_folder / kind).glob(f"{kind}*")):
                image = decode_image(path.read_bytes(), limits, engine.input_size)
                answers = classifier.classify(image, threshold=0.0, limit=3)
                confidence = {answer.label: answer.confidence for answer in answers}
                mistake = mistakes.get(str(path))
                if answers[0].confidence - answers[1].confidence >= 0.02:
                    assert (mistake["predicted"] if mistake else kind) == answers[0].label, (name, path)
                if mistake:
                    assert mistake["confidence"] == pytest.approx(confidence[mistake["predicted"]], abs=3e-3)
                    assert mistake["expected_confidence"] == pytest.approx(confidence[kind], abs=3e-3)
                    expected, others = confidence[kind], confidence.values()
                    assert (1 + sum(c > expected + 3e-3 for c in others)
                            <= mistake["expected_rank"] <= sum(c >= expected - 3e-3 for c in others))
                    compared += 1
    assert compared >= 1  # the random model gets some wrong; their confidences were compared


def test_report_a_all_labels_reports_a_missing_label(image_folder, tiny_model_dir, labels_dir, tmp_path,
                                                       capsys):
    out = tmp_path / "all.json"
    code = accuracy.main([str(image_folder), "--model", f"local-dir:{tiny_model_dir}", "--labels", "all",
                          "--labels-dir", str(labels_dir), "--json", str(out),
                          "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["missing_labels"] == ["car"]
    assert report["excluded_images"] == PER_CLASS
    assert {c["label"]: c["candidate"] for c in report["classes"]} == {"car": False, "cat": True, "dog": True}
    assert report["candidates"] == 10  # conftest's vocabulary
    result = report["result"]
    assert result["images_scored"] == 2 * PER_CLASS
    for name in ("ensemble", "single"):
        _check_prompt_set(result[name], 2 * PER_CLASS, 10, {"cat", "dog"})
        assert not result[name]["top5_is_trivial"]
    assert "Not in the vocabulary, excluded (3 images): car" in capsys.readouterr().out


def test_compare_in_process_reports_unloadable_models_and_goes_on(image_folder, tiny_model_dir, tmp_path):
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text((tiny_model_dir / "open_clip_config.json").read_text())
    out = tmp_path / "b.json"
    models = [f"local-dir:{tiny_model_dir}", f"local-dir:{no_weights}", "NoSuchModel"]
    code = accuracy.main([str(image_folder), "--compare", *models, "--json", str(out),
                          "--cache-dir", str(tmp_path / "cache"), "--quiet", "--per-class", "2"])
    assert code == 0
    rows = json.loads(out.read_text())["models"]
    assert [row["model"] for row in rows] == models
    assert rows[0]["status"] == "ok" and rows[0]["images_scored"] == 2 * 3 - 1  # broken.jpg is one of cat's 2
    assert rows[0]["images_per_s"] > 0 and 0 <= rows[0]["ensemble"]["top1"] <= 1
    assert [row["status"] for row in rows[1:]] == ["unavailable", "unavailable"]
    assert "holds no weights" in rows[1]["reason"] and "not a known model" in rows[2]["reason"]

    assert accuracy.main([str(image_folder), "--compare", "NoSuchModel", "--quiet",
                          "--cache-dir", str(tmp_path / "cache")]) == 1  # nothing could be measured


def test_report_a_with_an_unloadable_model_fails_cleanly(image_folder, tmp_path, capsys):
    assert accuracy.main([str(image_folder), "--model", "NoSuchModel", "--quiet"]) == 1
    assert "NoSuchModel is not a known model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        accuracy.main([str(tmp_path / "missing"), "--quiet"])
    assert exit_info.value.code == 2
    (tmp_path / "flat").mkdir()
    assert accuracy.main([str(tmp_path / "flat"), "--quiet"]) == 2
    assert "has no sub-folders" in capsys.readouterr().err


def test_cli_compare_with_an_offline_hub_model(image_folder, tiny_model_dir, tmp_path):
    """As a command (python -m bench.accuracy, from the repository root): the tiny model is measured;
    ViT-B/32, with no cache and the hub offline, is not."""
    out = tmp_path / "b.json"
    (tmp_path / "hf").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-m", "bench.accuracy", str(image_folder), "--compare",
         f"local-dir:{tiny_model_dir}", "ViT-B/32", "--json", str(out),
         "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["models"]
    assert rows[0]["status"] == "ok" and rows[0]["images_scored"] == 3 * PER_CLASS
    assert rows[0]["published_imagenet_top1"] is None
    assert rows[1]["status"] == "unavailable" and "ViT-B/32" in rows[1]["reason"]
    assert rows[1]["published_imagenet_top1"] == 63.3
    assert "ViT-B/32" in done.stdout and "unavailable: CLIP_MODEL=ViT-B/32" in done.stdout
    assert "63.3" in done.stdout


@pytest.mark.parametrize("backend, precision", [("openvino", "int8"), ("torch", "fp32")])
def test_report_a_takes_the_engine_and_precision(image_folder, tiny_model_dir, tmp_path, capsys, backend,
                                                  precision):
    """So top-1 can be compared between engines and precisions the day real weights are present."""
    out = tmp_path / "a.json"
    assert accuracy.main([str(image_folder), "--model", f"local-dir:{tiny_model_dir}", "--json", str(out),
                          "--cache-dir", str(tmp_path / "cache"), "--quiet", "--backend", backend,
                          "--precision", precision]) == 0
    result = json.loads(out.read_text())["result"]
    assert (result["backend"], result["image_dtype"]) == (backend, precision)
    assert result["images_scored"] == 3 * PER_CLASS
    assert f"{backend} {precision}" in capsys.readouterr().out
