#!/usr/bin/env bash
# LiteLLM's proxy in its own virtual environment, for bench/relay.py's peer anchor (configuration "litellm").
# Never a guardproxy dependency: it lives outside the project's environment.
#
#   bench/setup_litellm.sh [VENV]     # default: $GUARDPROXY_BENCH_CACHE/litellm-venv (/tmp/guardproxy-bench/...)
#
# Installs 'litellm[proxy]' with the ordinary pip client from the configured package index. Prints the installed
# version; exits non-zero (with pip's message) when it cannot be installed, e.g. offline without a local index.
set -euo pipefail
VENV="${1:-${GUARDPROXY_BENCH_CACHE:-/tmp/guardproxy-bench}/litellm-venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/litellm" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q 'litellm[proxy]'
fi
"$VENV/bin/pip" show litellm | sed -n 's/^Version: /litellm /p'
