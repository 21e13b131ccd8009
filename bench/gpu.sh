#!/usr/bin/env bash
# GPU figures for the speed benchmark: ViT-B/32 and ViT-L/14 (full size, random weights), 640x480
# uploads and file= requests at 1, 16 and 64 clients, the service against the naive reference; then the
# peer comparison (bench/peers.py): the service's /embed against infinity on the same GPU, ViT-B/32 with
# the same random weights, 640x480 images at 1, 16 and 64 clients (infinity on CUDA: its torch engine,
# fp16 by its auto dtype; the service: CLIP.sh's GPU defaults).
#
# For a CUDA machine that has python3 with torch but no network (the workplace's device machine):
# the missing packages travel as wheels in .whl/ (the service's) and .whl/peers/ (infinity's venv,
# made on top of the machine's torch); bench/README.md, "GPU figures", says how to fetch them. Results
# go to $OUT (or bench/) as gpu-<arch>.json and gpu-peers.json, and the tables to stdout.
# PEERS_ONLY=1 runs only the peer comparison; NO_PEERS=1 skips it.
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
if [ -z "${PEERS_ONLY:-}" ]; then
    for arch in ViT-B-32 ViT-L-14; do
        CLIP_VENV="$venv" PYTHONUNBUFFERED=1 "$venv/bin/python" -m bench.speed --arch "$arch" \
            --concurrency 1,16,64 --sizes 640x480 --seconds "${SECONDS_PER_CELL:-6}" \
            --memory-requests 0 --out "$out/gpu-$arch.json"
    done
fi
if [ -z "${NO_PEERS:-}" ]; then
    peer_pip=""
    if [ -d .whl/peers ]; then
        peer_pip="--no-index --find-links $PWD/.whl/peers"
    fi
    CLIP_VENV="$venv" PYTHONUNBUFFERED=1 "$venv/bin/python" -m bench.peers --arch ViT-B-32 \
        --concurrency 1,16,64 --seconds "${SECONDS_PER_CELL:-6}" --work /tmp/clip-peers \
        --peer-system-torch --peer-pip-args="$peer_pip" --out "$out/gpu-peers.json"
fi
