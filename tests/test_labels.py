import json

import pytest
import torch

from clip_service.settings import PROJECT_ROOT
from clip_service.vocabulary.emoji import concept_key
from clip_service.vocabulary.features import build_vocabulary, cache_key
from clip_service.vocabulary.labels import LabelsError, LabelSet, load_labels
from tests.support.system import run_unprivileged, shared_folder


def test_labels_rules(tmp_path):
    (tmp_path / "b_second.txt").write_text("Dog\nzebra\n")
    (tmp_path / "a_first.txt").write_text("# animals\n\ncat\n  dog  \nCAT\nred   fox\n")
    (tmp_path / "notes.md").write_text("ignored\n")
    label_set = load_labels(tmp_path)
    assert label_set.labels == ("cat", "dog", "red fox", "zebra")
    assert label_set.groups == {"a_first": ("cat", "dog", "red fox"), "b_second": ("zebra",)}


def test_no_labels_stops_start_up(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing here\n\n")
    with pytest.raises(LabelsError, match="No labels loaded"):
        load_labels(tmp_path)


def test_shipped_vocabulary_is_real():
    label_set = load_labels(PROJECT_ROOT / "labels")
    assert len(label_set) >= 1200
    assert len([group for group, labels in label_set.groups.items() if labels]) >= 10
    for expected in ("cat", "dog", "man", "woman", "pizza", "beach", "car", "guitar"):
        assert expected in label_set.labels


def test_shipped_emoji_dictionary_covers_the_vocabulary():
    labels = load_labels(PROJECT_ROOT / "labels").labels
    dictionary = json.loads((PROJECT_ROOT / "labels" / "emoji.json").read_text(encoding="utf-8"))
    covered = [label for label in labels if dictionary.get(concept_key(label))]
    assert len(covered) / len(labels) >= 0.95


class CountingEncoder:
    """A fake text tower: deterministic unit features, and a count of encoded texts."""

    def __init__(self, identity="fake-model"):
        self.identity = identity
        self.encoded = 0

    def encode_texts(self, texts):
        self.encoded += len(texts)
        generator = torch.Generator().manual_seed(len(texts))
        return torch.nn.functional.normalize(torch.randn(len(texts), 8, generator=generator), dim=-1)


LABEL_SET = LabelSet(("cat", "dog", "tree"))


def test_features_are_cached_and_reused(tmp_path):
    encoder = CountingEncoder()
    first = build_vocabulary(encoder, LABEL_SET, ("a photo of a {}.",), tmp_path).features
    second = build_vocabulary(encoder, LABEL_SET, ("a photo of a {}.",), tmp_path).features
    assert encoder.encoded == 3
    assert torch.equal(first, second)


@pytest.mark.parametrize("change", ["model", "template", "labels"])
def test_cache_key_covers_model_template_and_labels(tmp_path, change):
    build_vocabulary(CountingEncoder(), LABEL_SET, ("a photo of a {}.",), tmp_path)
    encoder = CountingEncoder("other-model" if change == "model" else "fake-model")
    template = "art of a {}." if change == "template" else "a photo of a {}."
    label_set = LabelSet(("cat", "dog", "bush")) if change == "labels" else LABEL_SET
    build_vocabulary(encoder, label_set, (template,), tmp_path)
    assert encoder.encoded == 3
    assert len({cache_key(e, (t,), lbl.texts) for e, t, lbl in [
        ("fake-model", "a photo of a {}.", LABEL_SET), (encoder.identity, template, label_set)]}) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_cache_is_rebuilt_not_used(tmp_path, damage):
    encoder = CountingEncoder()
    good = build_vocabulary(encoder, LABEL_SET, ("a photo of a {}.",), tmp_path).features
    (path,) = tmp_path.glob("label-features-*.safetensors")
    data = path.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"not a cache" * 10,
               "flip": data[:-4] + bytes(b ^ 0xFF for b in data[-4:])}[damage]
    path.write_bytes(damaged)
    again = build_vocabulary(encoder, LABEL_SET, ("a photo of a {}.",), tmp_path).features
    assert encoder.encoded == 6
    assert torch.equal(good, again)
    build_vocabulary(encoder, LABEL_SET, ("a photo of a {}.",), tmp_path)
    assert encoder.encoded == 6, "the rebuilt cache is valid and used"


def test_unwritable_cache_only_costs_the_cache():
    with shared_folder() as folder:
        folder.chmod(0o555)

        def check():  # as an unprivileged user, even when the suite runs as root (CI)
            encoder = CountingEncoder()
            features = build_vocabulary(encoder, LABEL_SET, ("{}",), folder / "cache").features
            assert features.shape == (3, 8)
            assert build_vocabulary(encoder, LABEL_SET, ("{}",), folder / "cache").features.shape == (3, 8)
            assert encoder.encoded == 6, "nothing was cached, so the second build encodes again"

        run_unprivileged(check)
        assert list(folder.iterdir()) == []


def test_cache_folder_that_is_a_file_only_costs_the_cache(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    encoder = CountingEncoder()
    features = build_vocabulary(encoder, LABEL_SET, ("{}",), blocker).features
    assert features.shape == (3, 8)
    build_vocabulary(encoder, LABEL_SET, ("{}",), blocker)
    assert encoder.encoded == 6
