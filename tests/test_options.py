"""Per-request options (http/options.py), /labels, label groups and reloading the vocabulary without a
restart (vocabulary/reload.py)."""

import dataclasses
import io

import pytest
import torch
from PIL import Image

from clip_service.errors import BadInput
from clip_service.http.options import MAX_REQUEST_LABELS, parse_options
from clip_service.vocabulary.features import ensemble_features
from tests.support.images import image_bytes
from tests.support.responses import assert_error, assert_success, upload

GROUPS = ("animals", "foods", "people")


def options(**values):
    return parse_options(lambda name: [values[name]] if name in values else [], 0.01, 10, GROUPS)


def test_defaults_come_from_the_settings():
    parsed = options()
    assert (parsed.threshold, parsed.limit, parsed.labels, parsed.groups) == (0.01, 10, None, None)


def test_values_are_parsed_and_cleaned():
    parsed = options(threshold="0.2", limit="3", labels=" red  car, dog ,,dog")
    assert (parsed.threshold, parsed.limit, parsed.labels) == (0.2, 3, ("red car", "dog"))
    assert options(groups="foods,animals").groups == ("foods", "animals")


@pytest.mark.parametrize("values, message", [
    ({"threshold": "high"}, "threshold=high is not a number"),
    ({"threshold": "1.5"}, "threshold=1.5 is out of range"),
    ({"threshold": "nan"}, "threshold=nan is out of range"),
    ({"limit": "0"}, "limit=0 is out of range; allowed: an integer from 1 to 10"),
    ({"limit": "11"}, "limit=11 is out of range; allowed: an integer from 1 to 10"),
    ({"limit": "two"}, "limit=two is not an integer"),
    ({"labels": " , "}, "labels is empty"),
    ({"labels": ",".join(f"l{i}" for i in range(MAX_REQUEST_LABELS + 1))}, "the limit is 100"),
    ({"labels": "x" * 65}, "longer than 64 characters"),
    ({"groups": "animals,planets"}, "groups: planets is not a label group; known: animals, foods, people"),
    ({"labels": "cat", "groups": "animals"}, "Give labels or groups, not both"),
])
def test_bad_values_name_the_parameter(values, message):
    with pytest.raises(BadInput, match=message):
        options(**values)


def test_repeated_option_is_refused():
    with pytest.raises(BadInput, match="Give limit only once"):
        parse_options(lambda name: ["1", "2"] if name == "limit" else [], 0.01, 10, GROUPS)


def test_threshold_and_limit_per_request(client):
    body = assert_success(client.post("/analyze?limit=2&threshold=0",
                                      data={"file": (io.BytesIO(image_bytes()), "x.png")}))
    assert len(body["predictions"]) == 2
    assert assert_success(upload(client, image_bytes()))["predictions"].__len__() == 10
    assert_error(client.post("/analyze?limit=50", data={"file": (io.BytesIO(image_bytes()), "x.png")}),
                 400, "limit=50")


def test_options_may_come_as_form_fields(client):
    response = client.post("/analyze", data={"file": (io.BytesIO(image_bytes()), "x.png"), "limit": "1"})
    assert len(assert_success(response)["predictions"]) == 1


def test_request_labels_replace_the_vocabulary(client):
    response = client.post("/analyze?labels=red%20apple,blue%20sky,cat",
                           data={"file": (io.BytesIO(image_bytes()), "x.png")})
    predictions = assert_success(response)["predictions"]
    assert {p["label"] for p in predictions} == {"red apple", "blue sky", "cat"}
    assert sum(p["confidence"] for p in predictions) == pytest.approx(1.0, abs=0.005)
    assert next(p for p in predictions if p["label"] == "cat")["emoji"] == "🐱"


def test_request_label_features_are_cached(app, client):
    classifier = app.extensions["clip_service"].classifier
    calls = []
    original = classifier.engine.encode_texts

    def counting(texts, **kwargs):
        calls.append(list(texts))
        return original(texts, **kwargs)

    classifier.engine.encode_texts = counting
    try:
        for _ in range(3):
            assert_success(client.post("/analyze?labels=zebra,giraffe",
                                       data={"file": (io.BytesIO(image_bytes()), "x.png")}))
    finally:
        del classifier.engine.encode_texts
    assert sum(len(batch) for batch in calls) == 2 * len(classifier.vocabulary.templates)


def test_groups_score_only_their_labels(client):
    response = client.post("/analyze?groups=foods", data={"file": (io.BytesIO(image_bytes()), "x.png")})
    predictions = assert_success(response)["predictions"]
    assert {p["label"] for p in predictions} == {"banana", "coffee", "pizza"}
    assert_error(client.get("/analyze?groups=planets&file=/x.jpg"), 400, "known: animals, foods, people")


def own_features(engine, texts, templates):
    """(L, D): each text encoded on its own, the reference every scored row must equal."""
    return torch.cat([ensemble_features(engine, (text,), templates) for text in texts])


def test_request_labels_get_their_own_features(app):
    classifier = app.extensions["clip_service"].classifier
    templates = classifier.vocabulary.templates
    for labels in [("zebra", "giraffe"), ("lion", "giraffe", "okapi", "zebra")]:  # then partly cached
        features = classifier.candidates(labels=labels).features
        assert torch.allclose(features, own_features(classifier.engine, labels, templates), atol=1e-5), \
            f"{labels}: a label scored against another label's feature"


def test_groups_score_their_labels_own_features(app, client):
    classifier = app.extensions["clip_service"].classifier
    labels, features = classifier.label_set.labels, classifier.features
    candidates = classifier.candidates(groups=("people", "foods"))
    names, rows = candidates.labels, candidates.features
    assert names == ("man", "woman", "astronaut", "banana", "coffee", "pizza")
    for name, row in zip(names, rows, strict=True):
        assert torch.equal(row, features[labels.index(name)]), f"{name} is scored against another row"
    response = client.post("/analyze?groups=foods&threshold=0",
                           data={"file": (io.BytesIO(image_bytes()), "x.png")})
    confidences = {p["label"]: p["confidence"] for p in assert_success(response)["predictions"]}
    image = classifier.image_features(Image.open(io.BytesIO(image_bytes())).convert("RGB"))
    foods = [labels.index(name) for name in ("banana", "coffee", "pizza")]
    expected = (classifier.engine.logit_scale * features[foods] @ image).softmax(dim=-1)
    for name, probability in zip(("banana", "coffee", "pizza"), expected.tolist(), strict=True):
        assert confidences[name] == pytest.approx(probability, abs=0.002), name


def test_labels_listing(client):
    response = client.get("/labels")
    assert response.status_code == 200
    body = response.get_json()
    assert body["num_labels"] == 10 and len(body["version"]) == 12
    assert body["groups"]["animals"][0] == {"label": "cat", "emoji": "🐱"}
    assert body["groups"]["people"][2] == {"label": "astronaut"}


def test_reload_encodes_only_new_labels_and_changes_the_version(make_app, settings, tmp_path, caplog):
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "animals.txt").write_text("cat\ndog\n")
    app = make_app(dataclasses.replace(settings, labels_dir=folder))
    service = app.extensions["clip_service"]
    client = app.test_client()
    before = client.get("/labels").get_json()["version"]
    (folder / "animals.txt").write_text("cat\ndog\nhorse\n")
    caplog.clear()
    assert service.reload_labels()
    assert "Encoding 1 labels" in caplog.text
    after = client.get("/labels").get_json()
    assert after["version"] != before and after["num_labels"] == 3
    response = assert_success(upload(client, image_bytes()))
    assert response["metadata"]["model_info"]["labels_version"] == after["version"]


def test_reload_keeps_each_label_with_its_own_feature(make_app, settings, tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "animals.txt").write_text("cat\ndog\nbird\n")
    app = make_app(dataclasses.replace(settings, labels_dir=folder))
    service = app.extensions["clip_service"]
    (folder / "animals.txt").write_text("horse\nbird\ncat | a tabby cat\ndog\n")  # every row moves
    assert service.reload_labels()
    vocabulary = service.classifier.vocabulary
    assert vocabulary.label_set.texts == ("horse", "bird", "a tabby cat", "dog")
    expected = own_features(service.classifier.engine, vocabulary.label_set.texts, vocabulary.templates)
    assert torch.allclose(vocabulary.features, expected, atol=1e-5), "a reloaded label has another's feature"


def test_reload_after_a_template_change_encodes_every_label_again(make_app, settings, tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "animals.txt").write_text("cat\ndog\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a {}.\n")
    app = make_app(dataclasses.replace(settings, labels_dir=folder, prompts_file=prompts))
    service = app.extensions["clip_service"]
    prompts.write_text("a drawing of a {}.\n")
    assert service.reload_labels()
    vocabulary = service.classifier.vocabulary
    assert vocabulary.templates == ("a drawing of a {}.",)
    expected = own_features(service.classifier.engine, ("cat", "dog"), vocabulary.templates)
    assert torch.allclose(vocabulary.features, expected, atol=1e-5), "features of the old template kept"


def test_failed_reload_keeps_the_vocabulary(make_app, settings, tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "animals.txt").write_text("cat\ndog\n")
    app = make_app(dataclasses.replace(settings, labels_dir=folder))
    (folder / "animals.txt").write_text("# nothing left\n")
    assert not app.extensions["clip_service"].reload_labels()
    assert app.test_client().get("/labels").get_json()["num_labels"] == 2


@pytest.mark.parametrize(("file", "content", "said"), [
    ("animals.txt", b"caf\xe9\n", "is not UTF-8 (byte 3); save it as UTF-8"),
    ("prompts.txt", b"a {0} photo of {}\n", "exactly one {} and no other braces"),
    ("prompts.txt", b"a photo of {{}}\n", "exactly one {} and no other braces"),
], ids=["latin-1 label file", "template that cannot format", "template that drops the label"])
def test_a_reload_of_files_it_cannot_use_keeps_the_vocabulary_and_says_why(make_app, settings, tmp_path,
                                                                         caplog, file, content, said):
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "animals.txt").write_text("cat\ndog\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a {}.\n")
    app = make_app(dataclasses.replace(settings, labels_dir=folder, prompts_file=prompts, prompt_template=""))
    version = app.test_client().get("/labels").get_json()["version"]
    (tmp_path / "labels" / file if file == "animals.txt" else prompts).write_bytes(content)
    assert not app.extensions["clip_service"].reload_labels()
    after = app.test_client().get("/labels").get_json()
    assert (after["num_labels"], after["version"]) == (2, version)
    assert "Label reload failed, keeping version" in caplog.text and said in caplog.text


def test_labels_watch_reloads_on_change(make_app, settings, tmp_path):
    import time

    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "animals.txt").write_text("cat\n")
    app = make_app(dataclasses.replace(settings, labels_dir=folder, labels_watch=True))
    service = app.extensions["clip_service"]
    (folder / "animals.txt").write_text("cat\nzebra\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(service.classifier.label_set) != 2:
        time.sleep(0.05)
    assert service.classifier.label_set.labels == ("cat", "zebra")
