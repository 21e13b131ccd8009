import hashlib
import json

import pytest
import torch

from clip_service.settings import PROJECT_ROOT
from clip_service.vocabulary.emoji import concept_key
from clip_service.vocabulary.features import build_vocabulary, cache_key, ensemble_features
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


def text_feature(text: str, width: int = 8) -> torch.Tensor:
    """A unit vector that depends on the text alone: distinct texts get distinct directions."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return torch.nn.functional.normalize(torch.randn(width, generator=torch.Generator().manual_seed(seed)),
                                         dim=0)


class TextByTextEncoder:
    """A fake text tower whose feature of a text is the same in any batch, at any position."""

    identity = "text-by-text-model"

    def __init__(self):
        self.batches: list[list[str]] = []

    def encode_texts(self, texts):
        self.batches.append(list(texts))
        return torch.stack([text_feature(text) for text in texts])  # (N, 8)


# Labels with texts of their own, in no sorted order, so any shift or reordering pairs wrongly.
ANIMALS = LabelSet(("tabby", "dog", "fox", "cat"),
                   texts=("tabby cat", "dog", "red fox", "cat"))


def expected_row(text: str, templates: tuple[str, ...]) -> torch.Tensor:
    return torch.nn.functional.normalize(sum(text_feature(t.format(text)) for t in templates), dim=0)


def assert_rows_are_their_own_texts(features, texts, templates):
    assert features.shape == (len(texts), 8)
    for row, text in enumerate(texts):
        assert torch.allclose(features[row], expected_row(text, templates), atol=1e-6), \
            f"row {row} ({text!r}) does not hold the feature of its own text"


def test_each_label_gets_the_feature_of_its_own_text(tmp_path):
    templates = ("a photo of a {}.",)
    encoded = build_vocabulary(TextByTextEncoder(), ANIMALS, templates, tmp_path)
    assert_rows_are_their_own_texts(encoded.features, ANIMALS.texts, templates)
    encoder = TextByTextEncoder()
    cached = build_vocabulary(encoder, ANIMALS, templates, tmp_path)
    assert encoder.batches == [], "the second build is read from the cache"
    assert_rows_are_their_own_texts(cached.features, ANIMALS.texts, templates)


def test_ensemble_is_the_normalised_mean_of_the_templates_features():
    templates = ("a photo of a {}.", "a drawing of a {}.", "a {} in the wild.")
    texts = ("dog", "red fox")
    features = ensemble_features(TextByTextEncoder(), texts, templates)  # (2, 8)
    mean = torch.stack([text_feature(t.format("dog")) for t in templates]).mean(dim=0)
    assert mean.norm() < 0.9, "the fake's template features differ, so their mean is not unit"
    assert torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert torch.allclose(features[0], mean / mean.norm(), atol=1e-6)
    assert_rows_are_their_own_texts(features, texts, templates)


def test_reload_reuses_each_texts_own_feature(tmp_path):
    templates = ("a photo of a {}.", "art of a {}.")
    previous = build_vocabulary(TextByTextEncoder(), ANIMALS, templates, tmp_path / "first")
    reuse = previous.features_by_text()
    assert set(reuse) == set(ANIMALS.texts)
    for text, feature in reuse.items():
        assert torch.allclose(feature, expected_row(text, templates), atol=1e-6), text
    # A reload: a new label first (every old row moves), one dropped, the rest in another order.
    reloaded = LabelSet(("owl", "cat", "fox", "tabby"), texts=("snowy owl", "cat", "red fox", "tabby cat"))
    encoder = TextByTextEncoder()
    vocabulary = build_vocabulary(encoder, reloaded, templates, tmp_path / "second", reuse)
    assert encoder.batches == [[t.format("snowy owl")] for t in templates], "only the new label is encoded"
    assert_rows_are_their_own_texts(vocabulary.features, reloaded.texts, templates)


def test_new_labels_of_a_reload_get_their_own_features(tmp_path):
    templates = ("a photo of a {}.",)
    first = build_vocabulary(TextByTextEncoder(), LabelSet(("cat",)), templates, tmp_path / "a")
    reuse = first.features_by_text()
    grown = LabelSet(("zebra", "cat", "yak", "bee"))
    vocabulary = build_vocabulary(TextByTextEncoder(), grown, templates, tmp_path / "b", reuse)
    assert_rows_are_their_own_texts(vocabulary.features, grown.texts, templates)
