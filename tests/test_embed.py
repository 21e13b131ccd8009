"""/embed (http/embed.py) and tasks/embed.py: images and texts as unit vectors, in order, exactly the
features /analyze scores, as float lists or base64; and every refusal in the error shape."""

from __future__ import annotations

import base64
import dataclasses
import io
import time

import numpy as np
import pytest
import torch

from clip_service.http.limits import JSON_BODY_MAX
from clip_service.tasks.embed import Embedder, base64_rows, float_lists
from clip_service.tasks.encode import Encoder
from clip_service.vocabulary.custom_labels import CustomLabelCache
from tests.support.engines import EngineWrapper, GatedEngine
from tests.support.images import image_bytes
from tests.support.responses import assert_error, assert_success, upload

EMBED_KEYS = {"service", "status", "embeddings", "metadata"}
COLOURS = [(200, 30, 30), (30, 40, 210), (30, 200, 40)]


def embedded(response) -> np.ndarray:
    """The answer's vectors as an (N, D) float32 array, after checking the success shape."""
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert set(body) == EMBED_KEYS and (body["service"], body["status"]) == ("clip", "success")
    info = body["metadata"]["model_info"]
    assert set(info) == {"framework", "model", "device", "labels_version", "dimensions"}
    rows = body["embeddings"]
    if rows and isinstance(rows[0], str):
        vectors = np.stack([np.frombuffer(base64.b64decode(row), dtype="<f4") for row in rows])
    else:
        vectors = np.array(rows, dtype=np.float32)
    assert vectors.shape[1] == info["dimensions"] == 32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    return vectors


def files(*datas: bytes) -> dict:
    return {"data": {"file": [(io.BytesIO(data), f"{index}.png") for index, data in enumerate(datas)]},
            "content_type": "multipart/form-data"}


def test_an_image_embedding_is_the_feature_analyze_scores(app, client):
    data = image_bytes(colour=COLOURS[0])
    vector = embedded(client.post("/embed", **files(data)))[0]
    service = app.extensions["clip_service"]
    [image] = service.images.prepare_all([data])
    assert torch.equal(torch.from_numpy(vector), service.classifier.image_features(image))
    # and it reproduces /analyze's confidences: softmax of logit_scale * cosine over the labels
    classifier = service.classifier
    scores = torch.from_numpy(vector) @ classifier.features.T * classifier.engine.logit_scale
    expected = dict(zip(classifier.label_set.labels, scores.softmax(-1).tolist(), strict=True))
    for prediction in assert_success(upload(client, data))["predictions"]:
        assert prediction["confidence"] == round(expected[prediction["label"]], 3)


def test_several_files_come_back_in_order_as_one_pass(app, client):
    datas = [image_bytes(colour=colour) for colour in COLOURS]
    together = embedded(client.post("/embed", **files(*datas)))
    alone = [embedded(client.post("/embed", **files(data)))[0] for data in datas]
    np.testing.assert_allclose(together, np.stack(alone), atol=1e-5)
    assert not np.allclose(together[0], together[1], atol=1e-3)  # different pictures, different vectors
    assert 3 in app.extensions["clip_service"].batcher.batch_sizes


def test_url_file_and_upload_give_the_same_vector(make_app, settings, tmp_path, local_server):
    client = make_app(dataclasses.replace(settings, url_allowlist=("127.0.0.1",))).test_client()
    data = image_bytes("PNG", (90, 70), COLOURS[1])
    (tmp_path / "photo.png").write_bytes(data)
    local_server.routes["/photo.png"] = (200, {}, data)
    vectors = [embedded(client.post("/embed", **files(data)))[0],
               embedded(client.get("/embed", query_string={"file": str(tmp_path / "photo.png")}))[0],
               embedded(client.get("/embed", query_string={"url": local_server.url("/photo.png")}))[0]]
    assert np.array_equal(vectors[0], vectors[1]) and np.array_equal(vectors[0], vectors[2])


def test_texts_by_query_and_by_json_agree_and_keep_order_and_repeats(client):
    texts = ["a red circle", "cat", "a red circle"]
    by_query = embedded(client.get("/embed", query_string={"text": texts}))
    by_json = embedded(client.post("/embed", json={"texts": texts}))
    assert np.array_equal(by_query, by_json)
    assert np.array_equal(by_query[0], by_query[2]) and not np.allclose(by_query[0], by_query[1])


def test_plain_texts_are_encoded_exactly_as_written(app, client):
    """Without prompts a text goes to the text tower as it is: no template, no prefix (checking the
    routes only against each other would pass with any template applied to both)."""
    engine = app.extensions["clip_service"].classifier.engine
    texts = ["a red circle", "cat"]
    expected = torch.nn.functional.normalize(engine.encode_texts(texts).float(), dim=-1).numpy()
    assert np.allclose(embedded(client.get("/embed", query_string={"text": texts})), expected, atol=1e-6)


def test_prompted_texts_are_exactly_what_analyze_scores_labels_with(app, client):
    classifier = app.extensions["clip_service"].classifier
    vectors = embedded(client.post("/embed", json={"texts": ["dog", "red fox", "cat"], "prompts": True}))
    rows = classifier.vocabulary.text_rows
    assert torch.equal(torch.from_numpy(vectors[0]), classifier.features[rows["dog"]])
    assert torch.equal(torch.from_numpy(vectors[2]), classifier.features[rows["cat"]])
    # a text outside the vocabulary: the labels= feature, so /analyze?labels= is reproduced exactly
    data = image_bytes(colour=COLOURS[2])
    image = embedded(client.post("/embed", **files(data)))[0]
    probabilities = torch.from_numpy(vectors[[1, 2]] @ image * classifier.engine.logit_scale).softmax(-1)
    answer = assert_success(client.post("/analyze?labels=red fox,cat", **files(data)))["predictions"]
    expected = dict(zip(["red fox", "cat"], probabilities.tolist(), strict=True))
    assert {p["label"]: p["confidence"] for p in answer} == {k: round(v, 3) for k, v in expected.items()}
    plain = embedded(client.get("/embed", query_string={"text": "dog"}))[0]
    assert not np.allclose(plain, vectors[0], atol=1e-4)  # without prompts: the bare text's vector


def test_base64_is_the_same_float32_values(client):
    data = image_bytes(colour=COLOURS[0])
    floats = embedded(client.post("/embed", **files(data)))
    packed = embedded(client.post("/embed?encoding=base64", **files(data)))
    assert np.array_equal(floats, packed)
    texts = embedded(client.post("/embed", json={"texts": ["cat"], "encoding": "base64"}))
    assert np.array_equal(texts, embedded(client.get("/embed?text=cat")))


def test_float_lists_and_base64_rows_round_trip_exactly():
    vectors = torch.nn.functional.normalize(torch.randn(3, 7), dim=-1)
    assert np.array_equal(np.array(float_lists(vectors), dtype=np.float32), vectors.numpy())
    decoded = [np.frombuffer(base64.b64decode(row), dtype="<f4") for row in base64_rows(vectors)]
    assert np.array_equal(np.stack(decoded), vectors.numpy())


def test_text_embeddings_reuse_the_label_caches(app):
    classifier = app.extensions["clip_service"].classifier
    calls = []
    encode = classifier.engine.encode_texts

    class Counting:
        identity = classifier.engine.identity

        def encode_texts(self, texts):
            calls.append(len(texts))
            return encode(texts)

    embedder = Embedder(Encoder(classifier.engine, label_texts=CustomLabelCache(Counting()),
                                plain_texts=CustomLabelCache(Counting())), lambda: classifier.vocabulary)
    embedder.texts(["cat", "a dog on a beach"], prompts=True)  # cat: a vocabulary row, not encoded
    assert calls == [1] * len(classifier.vocabulary.templates)
    embedder.texts(["a dog on a beach"], prompts=True)
    embedder.texts(["x", "x", "y"])
    embedder.texts(["y"])
    assert calls == [1] * len(classifier.vocabulary.templates) + [2]


JSON = "application/json"


@pytest.mark.parametrize("kwargs, fragment", [
    ({"method": "GET"}, "got none"),
    ({"method": "GET", "query_string": {"text": "cat", "url": "http://a.example/x.jpg"}}, "got url and text"),
    ({"method": "POST", "json": {"texts": ["cat"]}, "query_string": {"text": "dog"}},
     "got text and JSON texts"),
    ({"method": "POST", "json": ["cat"]}, "must be an object"),
    ({"method": "POST", "json": {"text": ["cat"]}}, "Unknown key 'text'"),
    ({"method": "POST", "json": {"texts": "cat"}}, "a list of strings"),
    ({"method": "POST", "json": {"texts": []}}, "texts is empty"),
    ({"method": "POST", "json": {"texts": ["cat", "  "]}}, "texts[1] is empty"),
    ({"method": "POST", "json": {"texts": ["cat"], "prompts": "maybe"}}, "not a boolean"),
    ({"method": "POST", "json": {"texts": ["cat"], "prompts": 3}}, "true or false"),
    ({"method": "POST", "json": {"texts": ["cat"], "encoding": "hex"}}, "not an encoding"),
    ({"method": "POST", "json": {"texts": ["cat"], "encoding": "float"},
      "query_string": {"encoding": "float"}}, "Give encoding once"),
    ({"method": "POST", "json": {"texts": [f"t{i}" for i in range(101)]}},
     "texts has 101 texts; the limit is 100"),
    ({"method": "POST", "json": {"texts": ["x" * 65]}}, "longer than 64 characters"),
    ({"method": "GET", "query_string": {"text": ["cat"], "encoding": ["float", "base64"]}},
     "Give encoding only once"),
    ({"method": "POST", "data": "texts=cat", "content_type": "text/plain"}, "multipart/form-data"),
    ({"method": "POST", "data": "[" * 20_000, "content_type": JSON}, "nested too deeply"),
    ({"method": "POST", "data": '{"texts": ["a\\ud800b"]}', "content_type": JSON},
     "texts[0] is not valid Unicode"),
    ({"method": "POST", "data": '{"texts": ["a"], "encoding": "\\ud800"}', "content_type": JSON},
     "encoding=\\ud800 is not an encoding"),
    ({"method": "POST", "data": '{"texts": ["a"], "prompts": "\\udfff"}', "content_type": JSON},
     "prompts=\\udfff is not a boolean"),
])
def test_bad_requests_are_400(client, kwargs, fragment):
    method = kwargs.pop("method")
    assert_error(client.open("/embed", method=method, **kwargs), 400, fragment)


def test_a_json_body_larger_than_any_valid_texts_request_is_413(client):
    """An 8 MB list of nothing would otherwise be parsed (hundreds of MB) before its 400."""
    body = '{"texts": [' + ",".join(["{}"] * (JSON_BODY_MAX // 3 + 1)) + "]}"
    assert_error(client.post("/embed", data=body, content_type="application/json"), 413)


def test_bad_image_inputs_are_refused_naming_the_file(make_app, settings):
    client = make_app(dataclasses.replace(settings, batch_files_max=3)).test_client()
    good = image_bytes()
    assert_error(client.post("/embed", **files(good, b"not an image", good)), 400,
                 "file 2 of 3: Not an image")
    assert_error(client.post("/embed", **files(*[good] * 4)), 400, "at most 3 images", "BATCH_FILES_MAX",
                 "4 were sent")
    assert_error(client.post("/embed?prompts=true", **files(good)), 400, "prompts applies to texts only")
    raw_body = embedded(client.post("/embed", data=good, content_type="image/png"))
    assert raw_body.shape == (1, 32)  # a raw image body, as on /analyze


def test_not_ready_is_503_before_anything_is_encoded(make_app, settings, tiny_engine):
    asked = []  # every encode_texts call, recorded before it waits at the gate

    class Recording(GatedEngine):
        def encode_texts(self, texts):
            asked.append(list(texts))
            return super().encode_texts(texts)

    engine = Recording(tiny_engine)
    app = make_app(settings, engine=engine, wait=False)
    try:
        response = app.test_client().get("/embed?text=cat")
        assert_error(response, 503, "still loading")
        assert response.headers["Retry-After"]
        assert ["cat"] not in asked and engine.batches == [], "the request encoded nothing"
    finally:
        engine.gate.set()
        assert app.extensions["clip_service"].wait_until_settled(30)  # no load left running at exit


def test_texts_share_the_token_budget_of_labels(make_app, settings):
    client = make_app(dataclasses.replace(settings, labels_token_budget=40)).test_client()
    texts = [f"a photo of a very red circle number {index}" for index in range(5)]  # 11 tokens each
    assert_error(client.post("/embed", json={"texts": texts}), 400,
                 "texts asks to encode 5 new texts under 1 prompt template(s)", "LABELS_TOKEN_BUDGET")
    assert_error(client.post("/embed", json={"texts": ["red fox"], "prompts": True}), 400,
                 "under 8 prompt template(s)", "over the limit of 40")
    assert embedded(client.post("/embed", json={"texts": texts[:3]})).shape == (3, 32)
    assert embedded(client.post("/embed", json={"texts": ["cat"], "prompts": True})).shape == (1, 32)


def test_texts_keep_to_the_request_timeout(make_app, settings, tiny_engine):
    """The fakes slowed only image encoding: a text tower as slow as a big model's on a small CPU must
    end in 504 near REQUEST_TIMEOUT, not when every text is done."""
    class SlowTexts(EngineWrapper):
        def encode_texts(self, texts):
            time.sleep(0.25)
            return self._engine.encode_texts(texts)

    app = make_app(dataclasses.replace(settings, request_timeout=1.0), engine=SlowTexts(tiny_engine))
    texts = [f"a picture number {index}" for index in range(100)]  # 7 passes of 16: 1.75 s
    began = time.monotonic()
    assert_error(app.test_client().post("/embed", json={"texts": texts}), 504, "REQUEST_TIMEOUT")
    assert time.monotonic() - began < 1.0 + 0.5
