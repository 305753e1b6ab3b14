# guardproxy: streaming safety proxy for OpenAI-compatible endpoints (CPU image; see README for GPU).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    HF_HOME=/var/cache/huggingface

# A pinned CPU build of torch from PyTorch's CPU index (an unpinned torch would pull a multi-GB CUDA build).
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY guardproxy ./guardproxy
RUN pip install .

COPY policies /etc/guardproxy/policies
COPY config.example.yaml /etc/guardproxy/config.yaml

RUN useradd --system --home /app guardproxy && mkdir -p "$HF_HOME" && chown guardproxy "$HF_HOME"
USER guardproxy
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/healthz')"
# Mount your config over /etc/guardproxy/config.yaml: its upstream must be reachable from the container (the example's
# 127.0.0.1:8000 is the container itself; use e.g. http://host.docker.internal:8000/v1). Mount a Hub cache at $HF_HOME,
# or a checkpoint directory and append `--guard-model /models/guard`, for offline hosts:
#   docker run -p 8080:8080 -v $PWD/my.yaml:/etc/guardproxy/config.yaml -v /models:/models IMG --guard-model /models/guard
ENTRYPOINT ["guardproxy", "serve", "--config", "/etc/guardproxy/config.yaml", "--host", "0.0.0.0"]
CMD []
