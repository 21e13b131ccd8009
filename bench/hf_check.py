"""Run by infinity's venv python (transformers, no clip_service): a CLIPModel folder's features.

    python bench/hf_check.py HF_DIR IN_DIR

IN_DIR holds pixels.npy ((N, 3, H, W) float32, already prepared), tokens.npy ((M, 77) int64) and the
photos photo-*.jpg; written there: image.npy (the model on pixels.npy), processed.npy (the model on the
photos through the folder's own CLIPProcessor, as infinity prepares them) and text.npy.
bench/peers.py compares them with open_clip's own.
"""

import sys
from pathlib import Path

import numpy
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel


def main() -> None:
    hf_dir, folder = sys.argv[1], Path(sys.argv[2])
    model = CLIPModel.from_pretrained(hf_dir).eval()
    processor = AutoProcessor.from_pretrained(hf_dir)
    photos = [Image.open(path).convert("RGB") for path in sorted(folder.glob("photo-*.jpg"))]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.from_numpy(numpy.load(folder / "pixels.npy")))
        processed = model.get_image_features(**processor(images=photos, return_tensors="pt"))
        text = model.get_text_features(input_ids=torch.from_numpy(numpy.load(folder / "tokens.npy")))
    for name, features in (("image", image), ("processed", processed), ("text", text)):
        numpy.save(folder / f"{name}.npy", features.float().numpy())


if __name__ == "__main__":
    main()
