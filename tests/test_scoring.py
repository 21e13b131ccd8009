import pytest
import torch

from clip_service.scoring import Prediction, label_probabilities, top_predictions


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


def test_limit_larger_than_vocabulary():
    assert len(top_predictions(torch.tensor([0.5, 0.5]), ["x", "y"], 0.0, 10)) == 2
