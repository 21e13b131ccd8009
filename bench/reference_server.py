"""The seed's naive way of serving CLIP, kept only as the benchmark's baseline.

Flask's threaded development server, the model loaded before the port opens, text features computed
at start with the single prompt 'a photo of a {}.', a full PIL decode of every image, and one image
per forward pass with no lock and no batching: concurrent requests simply run their forward passes
side by side on the same cores. Deliberately nothing from clip_service except label loading, so every
gain the service makes over this file is a gain of the service, not of shared code.

    .venv/bin/python -m bench.reference_server --port 7779 --model local-dir:/tmp/model   # from the root
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import open_clip
import torch
from flask import Flask, jsonify, request
from PIL import Image

from clip_service.vocabulary.labels import load_labels  # the only import from the service

ROOT = Path(__file__).resolve().parent.parent

PROMPT = "a photo of a {}."
THRESHOLD = 0.01
MAX_PREDICTIONS = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "7779")))
    parser.add_argument("--model", default=os.environ.get("CLIP_MODEL", "ViT-B/32"),
                        help="any CLIP_MODEL form: OpenAI name, ARCH:PRETRAINED, hf-hub:, local-dir:")
    parser.add_argument("--labels-dir", type=Path, default=ROOT / "labels")
    return parser.parse_args(argv)


def open_clip_name(model: str) -> tuple[str, str | None]:
    """A CLIP_MODEL value -> (open_clip model name, pretrained tag), as the service reads it."""
    if model.startswith(("local-dir:", "hf-hub:")):
        return model, None
    if ":" in model:
        arch, tag = model.split(":", 1)
        return arch, tag
    # OpenAI's names: ViT-B/32 -> ViT-B-32-quickgelu, ViT-L/14@336px -> ViT-L-14-336-quickgelu.
    return model.replace("/", "-").replace("@336px", "-336") + "-quickgelu", "openai"


class Reference:
    """The model, its preprocess and the label text features: all loaded once, before serving."""

    def __init__(self, model: str, labels_dir: Path):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        name, pretrained = open_clip_name(model)
        precision = "fp16" if self.device == "cuda" else "fp32"
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=self.device, precision=precision)
        self.model.eval()
        self.dtype = next(self.model.parameters()).dtype
        self.name = model
        self.framework = "OpenAI" if pretrained == "openai" else "OpenCLIP"
        self.labels = load_labels(labels_dir).labels
        self.emoji = _emoji_dictionary(labels_dir / "emoji.json")
        tokenizer = open_clip.get_tokenizer(name)
        texts = [PROMPT.format(label) for label in self.labels]
        chunks = []
        with torch.no_grad():  # in chunks only to bound memory; the work is the same
            for start in range(0, len(texts), 256):
                tokens = tokenizer(texts[start:start + 256]).to(self.device)
                chunks.append(self.model.encode_text(tokens).float())
        features = torch.cat(chunks)
        self.text_features = features / features.norm(dim=-1, keepdim=True)
        self.logit_scale = float(self.model.logit_scale.exp())

    def predict(self, image: Image.Image) -> list[dict]:
        pixels = self.preprocess(image).unsqueeze(0).to(self.device, self.dtype)
        with torch.no_grad():
            features = self.model.encode_image(pixels).float()
            features = features / features.norm(dim=-1, keepdim=True)
            probabilities = (self.logit_scale * features @ self.text_features.T).softmax(dim=-1)[0]
        values, indices = probabilities.topk(min(MAX_PREDICTIONS, len(self.labels)))
        predictions = []
        for value, index in zip(values.tolist(), indices.tolist(), strict=True):
            if round(value, 3) < THRESHOLD:
                break
            label = self.labels[index]
            prediction = {"label": label, "confidence": round(value, 3)}
            emoji = self.emoji.get("_".join(label.lower().split()))
            if emoji:
                prediction["emoji"] = emoji
            predictions.append(prediction)
        return predictions


def _emoji_dictionary(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def _error(status: int, message: str, started: float):
    body = {"service": "clip", "status": "error", "predictions": [], "error": {"message": message},
            "metadata": {"processing_time": round(time.time() - started, 3)}}
    return jsonify(body), status


def create_app(reference: Reference) -> Flask:
    app = Flask(__name__)
    app.json.ensure_ascii = False

    @app.get("/health")
    def health():
        return jsonify({"status": "healthy", "model_status": "loaded", "device": reference.device,
                        "num_labels": len(reference.labels), "model": reference.name})

    @app.route("/analyze", methods=["GET", "POST"])
    def analyze():
        started = time.time()
        if request.method == "POST":
            upload = request.files.get("file")
            if upload is None:
                return _error(400, "No file uploaded", started)
            image = Image.open(upload.stream).convert("RGB")
        else:
            path = request.args.get("file")
            if not path:
                return _error(400, "No input given", started)
            if not os.path.isfile(path):
                return _error(404, f"File not found: {path}", started)
            image = Image.open(path).convert("RGB")
        predictions = reference.predict(image)
        model_info = {"framework": reference.framework, "model": reference.name,
                      "device": reference.device}
        return jsonify({"service": "clip", "status": "success", "predictions": predictions,
                        "metadata": {"processing_time": round(time.time() - started, 3),
                                     "model_info": model_info}})

    return app


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    reference = Reference(args.model, args.labels_dir)
    create_app(reference).run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
