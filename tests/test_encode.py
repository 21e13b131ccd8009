"""tasks/encode.py: one Encoder under both Classifier and Embedder, neither holding the other."""

from __future__ import annotations

import torch
from PIL import Image

from clip_service.tasks.classify import Classifier
from clip_service.tasks.embed import Embedder
from clip_service.tasks.encode import Encoder
from clip_service.vocabulary.reload import load_vocabulary


class NoEmoji:
    def emoji_for(self, label):
        return None


def test_classifier_and_embedder_share_one_encoder_and_agree(settings, tiny_engine):
    passes = []

    def counting(pixels, deadline=None):
        passes.append(len(pixels))
        return tiny_engine.encode_images(pixels)

    encoder = Encoder(tiny_engine, counting)
    classifier = Classifier(encoder, load_vocabulary(settings, tiny_engine), NoEmoji())
    embedder = Embedder(encoder, lambda: classifier.vocabulary)
    assert not hasattr(embedder, "classifier") and classifier.encoder is embedder.encoder
    image = Image.new("RGB", (80, 60), (200, 30, 30))
    inputs = [encoder.prepare(image)]
    assert torch.equal(embedder.images(inputs), classifier.image_features(image).unsqueeze(0))
    assert passes == [1, 1], "both went through the encoder's one image path"
    [predictions] = classifier.classify_prepared(inputs, 0.0, 3)
    expected = (tiny_engine.logit_scale * embedder.images(inputs) @ classifier.features.T).softmax(-1)[0]
    assert [p.confidence for p in predictions] == [round(v, 3) for v in expected.topk(3).values.tolist()]
    # labels= and /embed's prompted texts share the encoder's label cache: encoded once
    assert torch.equal(classifier.candidates(("purple",)).features[0],
                       embedder.texts(["purple"], prompts=True)[0])


def test_an_engine_alone_is_encoded_directly(tiny_engine, settings):
    classifier = Classifier(tiny_engine, load_vocabulary(settings, tiny_engine), NoEmoji())
    assert isinstance(classifier.encoder, Encoder) and classifier.engine is tiny_engine
