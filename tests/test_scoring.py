import dataclasses
import io

import pytest
import torch
from PIL import Image

from clip_service.tasks.classify import Prediction, label_probabilities, top_predictions
from tests.support.images import image_bytes
from tests.support.models import TINY_CONFIG, write_tiny_clip
from tests.support.responses import assert_success, upload


def test_zero_shot_rule_is_scaled_cosine_softmax():
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    labels = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    probabilities = label_probabilities(image, labels, logit_scale=10.0)
    cosines = torch.tensor([1.0, 0.0, 2 ** -0.5])
    expected = torch.exp(10 * cosines) / torch.exp(10 * cosines).sum()
    assert torch.allclose(probabilities[0], expected)
    assert probabilities.sum().item() == pytest.approx(1.0)


def test_top_predictions_sorted_thresholded_limited_and_rounded():
    probabilities = torch.tensor([0.05, 0.6, 0.0049, 0.3, 0.0451])
    labels = ["a", "b", "c", "d", "e"]
    emoji = {"b": "🅱️"}.get
    result = top_predictions(probabilities, labels, threshold=0.045, limit=10, emoji_for=emoji)
    assert result == [Prediction("b", 0.6, "🅱️"), Prediction("d", 0.3), Prediction("a", 0.05),
                      Prediction("e", 0.045)]
    assert top_predictions(probabilities, labels, threshold=0.0, limit=2) == [
        Prediction("b", 0.6), Prediction("d", 0.3)]


def test_threshold_applies_to_the_reported_confidence():
    probabilities = torch.tensor([0.25, 0.00996, 0.0094, 0.7346])
    labels = ["at", "rounds up", "rounds down", "top"]
    result = top_predictions(probabilities, labels, threshold=0.01, limit=10)
    assert result == [Prediction("top", 0.735), Prediction("at", 0.25), Prediction("rounds up", 0.01)], \
        "a reported 0.010 passes threshold 0.01, a reported 0.009 does not"
    assert top_predictions(probabilities, labels, threshold=0.25, limit=10) == [
        Prediction("top", 0.735), Prediction("at", 0.25)], "a confidence exactly at the threshold passes"


def test_limit_is_exact():
    probabilities = torch.tensor([0.4, 0.3, 0.2, 0.1])
    for limit in (1, 2, 3):
        assert len(top_predictions(probabilities, ["a", "b", "c", "d"], 0.0, limit)) == limit


def test_limit_larger_than_vocabulary():
    assert len(top_predictions(torch.tensor([0.5, 0.5]), ["x", "y"], 0.0, 10)) == 2


def test_sigmoid_models_score_each_label_on_its_own():
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    labels = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    probabilities = label_probabilities(image, labels, logit_scale=10.0, logit_bias=-5.0)
    assert torch.allclose(probabilities[0], torch.sigmoid(torch.tensor([10.0 - 5.0, -5.0])))
    more = torch.cat([labels, labels[1:]])
    assert torch.allclose(label_probabilities(image, more, 10.0, -5.0)[0, :2], probabilities[0]), \
        "adding labels does not change a sigmoid model's confidence in the others"


def test_sigmoid_model_end_to_end(make_app, settings, tmp_path):
    folder = write_tiny_clip(tmp_path / "siglip-like", model_cfg={**TINY_CONFIG, "init_logit_bias": -2.0})
    app = make_app(dataclasses.replace(settings, clip_model=f"local-dir:{folder}"))
    classifier = app.extensions["clip_service"].classifier
    assert classifier.engine.logit_bias == pytest.approx(-2.0)
    data = image_bytes()
    predictions = assert_success(upload(app.test_client(), data))["predictions"]
    image = classifier.image_features(Image.open(io.BytesIO(data)).convert("RGB"))
    expected = torch.sigmoid(classifier.engine.logit_scale * classifier.features @ image - 2.0)
    by_label = dict(zip(classifier.label_set.labels, expected.tolist(), strict=True))
    for prediction in predictions:
        assert prediction["confidence"] == pytest.approx(by_label[prediction["label"]], abs=0.002)
