# Three targets (BuildKit: RUN --mount; Docker >= 23 or DOCKER_BUILDKIT=1):
#   service (default): the ranking service on CPU, no torch.   docker build -t mtrank .
#   trainer: adds the training extra (torch CPU) for the        docker build --target trainer -t mtrank-trainer .
#     one-shot job (compose runs python -m training.bootstrap; the image's entrypoint is `mtrank`)
#   gpu: the ranking service on CUDA (onnxruntime-gpu only,     docker build --target gpu -t mtrank-gpu .
#     from a CUDA runtime image with cuDNN; run with --gpus all). Not built in CI (gigabytes).
#
# Build arguments (the defaults are the public images; docker-compose.local.yml and
# deploy/local-images.sh replace them with stand-ins built from Debian packages):
#   PYTHON_IMAGE     base of service and trainer (python 3.11 with pip on PATH)
#   CUDA_IMAGE       base of gpu: CUDA 12 runtime + cuDNN 9, what onnxruntime-gpu >= 1.20 links against
#   TORCH_INDEX_URL  where the trainer gets torch 2.13.0 (the PyTorch CPU index)
#   TORCH_WHEEL      or: a torch wheel inside the build context's deploy/wheels/, mounted at /wheels
#                    (e.g. /wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl)
# A CA bundle for a TLS-intercepting proxy may be passed as the build secret `ca`
# (--secret id=ca,src=/etc/ssl/certs/ca-certificates.crt): pip reads it during the RUN only, no
# layer holds it.
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# Layers: the dependencies (listed from pyproject.toml by deploy/requirements.py) are installed
# before the code is copied, so a code change rebuilds in seconds.
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# a fixed uid/gid (docker-compose.yml runs the service as 10001:10001); the code stays root-owned,
# so the service user cannot change it
RUN groupadd --gid 10001 mtrank && useradd --create-home --uid 10001 --gid 10001 mtrank \
 && mkdir -p /models /data && chown mtrank:mtrank /models /data
COPY pyproject.toml deploy/requirements.py ./

FROM base AS trainer
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEEL=
RUN --mount=type=secret,id=ca --mount=type=bind,source=deploy/wheels,target=/wheels \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -n "$TORCH_WHEEL" ]; then pip install "$TORCH_WHEEL"; \
    else pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0; fi \
 && python requirements.py train > /tmp/requirements.txt && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY service ./service
COPY training ./training
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --no-deps . && pip check
USER mtrank
ENV MTRANK_MODEL_STORE=/models
ENTRYPOINT ["mtrank"]

# The CUDA service: exactly one onnxruntime build (onnxruntime-gpu, the `gpu` extra), strict
# providers (the service refuses to start rather than fall back to CPU), one uvicorn worker per GPU.
FROM ${CUDA_IMAGE} AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
WORKDIR /app
RUN groupadd --gid 10001 mtrank && useradd --create-home --uid 10001 --gid 10001 mtrank \
 && mkdir -p /models && chown mtrank:mtrank /models
COPY pyproject.toml deploy/requirements.py ./
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && python requirements.py gpu > /tmp/requirements.txt && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY service ./service
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --no-deps '.[gpu]' && pip check \
 && python -c "import importlib.metadata as m, sys, service.app; \
names = {d.metadata['Name'].lower() for d in m.distributions()}; \
assert 'onnxruntime-gpu' in names and 'onnxruntime' not in names, 'one onnxruntime build: onnxruntime-gpu'; \
assert 'torch' not in sys.modules"
USER mtrank
ENV MTRANK_HOST=0.0.0.0 MTRANK_PORT=8000 MTRANK_MODEL_STORE=/models \
    MTRANK_PROVIDERS=cuda MTRANK_PROVIDERS_STRICT=1 MTRANK_WORKERS=1
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["mtrank", "serve"]

# The CPU service (the default target, last): exactly one onnxruntime build (onnxruntime, the
# `cpu` extra), no torch.
FROM base AS service
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && python requirements.py cpu > /tmp/requirements.txt && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY service ./service
COPY training ./training
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --no-deps '.[cpu]' && pip check \
 && python -c "import importlib.metadata as m, sys, service.app; \
names = {d.metadata['Name'].lower() for d in m.distributions()}; \
assert 'onnxruntime' in names and 'onnxruntime-gpu' not in names, 'one onnxruntime build: onnxruntime'; \
assert 'torch' not in sys.modules"
USER mtrank
ENV MTRANK_HOST=0.0.0.0 MTRANK_PORT=8000 MTRANK_MODEL_STORE=/models
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["mtrank", "serve"]
