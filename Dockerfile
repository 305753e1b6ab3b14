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
# Mount a Hub cache at $HF_HOME (or a checkpoint directory and pass --guard-model /path) for offline hosts.
ENTRYPOINT ["guardproxy", "serve"]
CMD ["--config", "/etc/guardproxy/config.yaml", "--host", "0.0.0.0"]
