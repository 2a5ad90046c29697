# Two targets:
#   service (default): the ranking service, no torch.      docker build -t mtrank .
#     --build-arg GPU=1 swaps onnxruntime for onnxruntime-gpu (the CUDA provider; run with --gpus all
#     and MTRANK_PROVIDERS=cuda,cpu)
#   trainer: adds the training extra (torch CPU) for the      docker build --target trainer -t mtrank-trainer .
#     one-shot job that trains, exports and loads features
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY training ./training
# a fixed uid/gid (docker-compose.yml runs the service as 10001:10001); the code stays root-owned,
# so the service user cannot change it
RUN groupadd --gid 10001 mtrank && useradd --create-home --uid 10001 --gid 10001 mtrank \
 && mkdir -p /models /data && chown mtrank:mtrank /models /data

FROM base AS trainer
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install '.[train]'
USER mtrank
ENV MTRANK_MODEL_STORE=/models
ENTRYPOINT ["mtrank"]

FROM base AS service
ARG GPU=0
RUN pip install . \
 && if [ "$GPU" = "1" ]; then pip uninstall -y onnxruntime && pip install '.[gpu]'; fi \
 && python -c "import sys, service.app; assert 'torch' not in sys.modules"
USER mtrank
ENV MTRANK_HOST=0.0.0.0 MTRANK_PORT=8000 MTRANK_MODEL_STORE=/models
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["mtrank", "serve"]
