# clip-service as a container image (README, "Container"). Needs BuildKit (docker 23+ uses it by
# default; DOCKER_BUILDKIT=1 on older ones).
#
#     docker build -t clip-service .                                  # CPU (the default)
#     docker build -t clip-service --build-arg VARIANT=cuda .         # CUDA: run with --gpus all
#
# VARIANT=cpu installs torch from PyTorch's CPU-only index (no CUDA libraries); VARIANT=cuda installs
# PyPI's torch, which brings NVIDIA's CUDA libraries with it (about 4 GB more). Wheels found in
# wheelhouse/ are installed instead of any index (`pip download -d wheelhouse -r requirements.txt`):
# builds without network access to PyPI.
#
# BASE: any Debian bookworm root file system with apt (the tests import one made by debootstrap).

ARG BASE=debian:bookworm-slim

# ---------------------------------------------------------------------------- shared by all stages
FROM ${BASE} AS system
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# ---------------------------------------------------------------------------- the virtual environment
FROM system AS build
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=""
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
RUN python3 -m venv /opt/clip-service/.venv
COPY requirements.txt /tmp/requirements.txt
# Only requirements.txt and wheelhouse/ decide whether this (large) layer is rebuilt: editing the code
# reuses it.
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    set -eu; \
    case "$VARIANT" in cpu|cuda) ;; *) echo "VARIANT=$VARIANT: use cpu or cuda" >&2; exit 1;; esac; \
    if ls /wheelhouse/*.whl >/dev/null 2>&1; then \
        source="--no-index --find-links /wheelhouse"; \
    elif [ -n "$TORCH_INDEX_URL" ]; then \
        source="--extra-index-url $TORCH_INDEX_URL"; \
    elif [ "$VARIANT" = cpu ]; then \
        source="--extra-index-url https://download.pytorch.org/whl/cpu"; \
    else \
        source=""; \
    fi; \
    /opt/clip-service/.venv/bin/pip install --no-cache-dir --disable-pip-version-check $source \
        -r /tmp/requirements.txt; \
    /opt/clip-service/.venv/bin/pip uninstall -y -q pip

# ---------------------------------------------------------------------------- nginx for compose.yaml
# Debian's nginx with services/nginx-clip.conf as its only site (docker build --target nginx).
FROM ${BASE} AS nginx
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /etc/nginx/sites-enabled/default \
    && ln -sf /dev/stdout /var/log/nginx/clip-service.access.log \
    && ln -sf /dev/stderr /var/log/nginx/error.log
COPY services/nginx-clip.conf /etc/nginx/conf.d/clip-service.conf
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]

# ---------------------------------------------------------------------------- the service (default)
FROM system AS runtime
# A user of its own; /cache is the one writable place (a volume: weights, HF_HOME, CLIP_CACHE_DIR).
RUN useradd --system --uid 10001 --user-group --home-dir /cache --no-create-home \
        --shell /usr/sbin/nologin clip \
    && mkdir -p /cache && chown clip:clip /cache && chmod 0755 /cache
COPY --from=build /opt/clip-service/.venv /opt/clip-service/.venv
COPY CLIP.sh REST.py gunicorn.conf.py /opt/clip-service/
COPY clip_service /opt/clip-service/clip_service
COPY labels /opt/clip-service/labels
COPY prompts /opt/clip-service/prompts
# Byte-code compiled now: the root file system is read-only when the service runs.
RUN /opt/clip-service/.venv/bin/python -m compileall -q /opt/clip-service/clip_service \
        /opt/clip-service/REST.py /opt/clip-service/gunicorn.conf.py
ENV PORT=7778 \
    PRIVATE=False \
    HOME=/cache \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    CLIP_CACHE_DIR=/cache/clip-service \
    PYTHONUNBUFFERED=1
VOLUME /cache
WORKDIR /opt/clip-service
USER clip:clip
EXPOSE 7778
# gunicorn stops gracefully on SIGTERM within graceful_timeout (35 s by default): give `docker stop`
# that long (--stop-timeout 40, compose's stop_grace_period).
STOPSIGNAL SIGTERM
# 503 while the model loads, 200 when ready. The service's own start may take minutes on a first
# start that downloads weights, hence the long start period.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["/opt/clip-service/.venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '7778'), timeout=4)"]
# tini passes SIGTERM and SIGHUP (reload the labels and the photo index) on to gunicorn.
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/clip-service/CLIP.sh"]
