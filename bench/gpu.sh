#!/usr/bin/env bash
# GPU figures for the speed benchmark: ViT-B/32 and ViT-L/14 (full size, random weights), 640x480
# uploads and file= requests at 1, 16 and 64 clients, the service against the naive reference.
#
# For a CUDA machine that has python3 with torch but no network (the workplace's device machine):
# the missing packages travel as wheels in .whl/ (bench/README.md, "GPU figures", says how to fetch
# them). Results go to $OUT (or bench/) as gpu-<arch>.json, and the tables to stdout.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
out="${OUT:-bench}"
venv=/tmp/clip-gpu-venv
python3 -m venv --system-site-packages "$venv"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$venv/bin/pip" install -q --no-index --no-deps --no-compile .whl/*.whl
fi
"$venv/bin/python" -c "import torch, open_clip, flask, gunicorn; assert torch.cuda.is_available(), 'no CUDA'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu-machine.txt"
for arch in ViT-B-32 ViT-L-14; do
    CLIP_VENV="$venv" PYTHONUNBUFFERED=1 "$venv/bin/python" -m bench.speed --arch "$arch" \
        --concurrency 1,16,64 --sizes 640x480 --seconds "${SECONDS_PER_CELL:-6}" \
        --memory-requests 0 --out "$out/gpu-$arch.json"
done
