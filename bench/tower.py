"""The image tower alone: milliseconds per image by precision, batch size and torch.compile.

Shows where the forward pass stands without HTTP or decoding, and whether an option pays on this
machine: `CLIP_PRECISION` (fp32, bf16 on CPUs with AMX, fp16 on CUDA) and torch.compile (tried for
the speed issue; not used by the service, see RESULTS.md). Random weights: speed does not depend on
them.

    .venv/bin/python -m bench.tower [--arch ViT-B-32] [--device cpu] [--compile]   # from the root
"""

from __future__ import annotations

import argparse
import time
import warnings

import open_clip
import torch


def per_image_ms(forward, pixels: torch.Tensor, repeats: int) -> float:
    """Mean milliseconds per image over `repeats` passes, after two warm-up passes."""
    with torch.inference_mode():
        forward(pixels)
        forward(pixels)
        if pixels.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            forward(pixels)
        if pixels.is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats / len(pixels) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B-32-quickgelu", help="an open_clip architecture")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to build)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    precisions = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}.get(device.type, ("fp32",))
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    batches = [int(size) for size in args.batches.split(",")]
    torch.manual_seed(0)
    model = open_clip.create_model(args.arch).eval()
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    print(f"{args.arch} image tower on {device} ({torch.get_num_threads()} threads), ms per image")
    print(f"{'precision':<10}{'compiled':<10}" + "".join(f"{'batch ' + str(b):>10}" for b in batches)
          + f"{'cosine vs fp32':>16}")
    reference = None
    for precision in precisions:
        visual = open_clip.create_model(args.arch).eval().visual
        visual.load_state_dict(model.visual.state_dict())
        visual = visual.to(device, dtypes[precision])
        pixels = torch.randn(max(batches), 3, size, size, generator=torch.Generator().manual_seed(1))
        pixels = pixels.to(device, dtypes[precision])
        variants = [("no", visual)]
        if args.compile:
            started = time.perf_counter()
            compiled = torch.compile(visual)
            with torch.inference_mode():
                compiled(pixels[:1])
            print(f"  (torch.compile for {precision}: {time.perf_counter() - started:.0f} s to build)")
            variants.append(("yes", compiled))
        for label, forward in variants:
            times = [per_image_ms(forward, pixels[:b], args.repeats) for b in batches]
            with torch.inference_mode():
                features = torch.nn.functional.normalize(forward(pixels).float(), dim=-1)
            reference = features if reference is None else reference
            cosine = torch.nn.functional.cosine_similarity(reference, features).min().item()
            print(f"{precision:<10}{label:<10}" + "".join(f"{t:>10.1f}" for t in times) + f"{cosine:>16.5f}")


if __name__ == "__main__":
    main()
