# rlrr-serve on a GPU host: `docker compose up` (see docker-compose.yml).
# torch/torchvision come from the CUDA-enabled base image; the rest from pyproject.toml.
# Override the base to match your driver: --build-arg BASE_IMAGE=pytorch/pytorch:<tag>
# (any image with python + pip first on PATH, writable, torch/torchvision installed; deploy/check-image.sh
# builds one from Debian)
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf \
    RLRR_STORE=/data/store \
    RLRR_COSTS_FILE=/data/store/.plan-costs.json \
    RLRR_HOST=0.0.0.0 \
    RLRR_PORT=8000

WORKDIR /srv
COPY pyproject.toml README.md ./
COPY adapters ./adapters
COPY trainer ./trainer
COPY app ./app
RUN pip install --no-cache-dir . \
    && groupadd --gid 10001 rlrr \
    && useradd --create-home --uid 10001 --gid 10001 rlrr \
    && mkdir -p /data/store /data/hf /data/runs \
    && chown -R rlrr:rlrr /data
# The demo adapters (for the default in-house backbone) seed the store: Docker copies an image's
# files into a named volume the first time it is created, and never again.
COPY --chown=10001:10001 demo/store /data/store

# Numeric ids: resolvable by the host (volume ownership) without its /etc/passwd.
USER 10001:10001
# The trainer's relative defaults (runs/<task>-...) land in /data, which the user owns.
WORKDIR /data
EXPOSE 8000
VOLUME ["/data/store", "/data/hf"]
# Ready = backbone loaded and warmed; start-period covers the first weight download/compile.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('RLRR_PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "app"]
