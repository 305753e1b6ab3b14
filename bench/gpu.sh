#!/usr/bin/env bash
# The guard engine on a GPU, in one prepared run (under 5 minutes on one CUDA GPU):
#
#   1. parity: the 0.6B shape (random weights) in bfloat16 against float32 on the same device; the largest
#      probability difference on the response heads must stay within bf16 tolerance (--max-prob-error, 0.05), or
#      the script stops (exit 2) before timing anything;
#   2. engine: bench/engine.py in bfloat16 at 1/16/64/256 concurrent streams (tokens/s, per-token latency,
#      the same matmuls alone, requests per GiB of KV with 4 choices, cost per token at positions 64/512/4096);
#   3. capacity: the number of streams the engine sustains at chat speed (30 tokens/s each), read from the 256-stream
#      row: engine tokens/s / 30, and the hold-back a paced stream would see at 256 streams (its p99 per-token
#      latency), printed as one line.
#
# Usage: bench/gpu.sh [--device cuda|cuda:N|cpu] [--out DIR]
#   --device cpu runs the same steps on the tiny shape with small stream counts (how the script is tested).
# Results: DIR (default bench/results-gpu-<date>) holds parity.json, engine.json, engine.md and capacity.txt.
set -euo pipefail

device=cuda
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 64 ;;
  esac
done

here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python}"
out="${out:-$here/bench/results-gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"

if [ "$device" = cpu ]; then
  shape=tiny; dtype=bfloat16; streams=1,4; prompt=32; response=16; positions=64,512; budget=120
  extra=(--skip-incremental)
else
  shape=0.6b; dtype=bfloat16; streams=1,16,64,256; prompt=256; response=64; positions=64,512,4096; budget=240
  extra=()
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --device cpu')"
fi

echo "[1/3] parity: $shape $dtype vs float32 on $device"
timeout "$budget" "$py" "$here/bench/engine.py" --shape "$shape" --device "$device" --dtype "$dtype" --parity-only \
  --prompt-len "$prompt" --response-len "$response" --max-prob-error 0.05 > "$out/parity.json"
cat "$out/parity.json"

echo "[2/3] engine: $shape $dtype on $device, streams $streams"
timeout "$budget" "$py" "$here/bench/engine.py" --shape "$shape" --device "$device" --dtype "$dtype" \
  --streams "$streams" --skip-reference "${extra[@]}" --prompt-len "$prompt" --response-len "$response" \
  --positions "$positions" --choices 4 --skip-agreement --json --md "$out/engine.md" > "$out/engine.json"
cat "$out/engine.md"

echo "[3/3] capacity at chat speed (30 tokens/s per stream)"
"$py" -S - "$out/engine.json" > "$out/capacity.txt" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
top = max(r["engine"], key=int)
tok_s, p99 = r["engine"][top], r["latency_ms"][f"engine{top}"]["p99"]
print(f"{r['shape']} {r['dtype_name']} on {r['device']}: {tok_s:.0f} tokens/s at {top} streams -> "
      f"{int(tok_s // 30)} streams at 30 tokens/s; per-token latency p99 at {top} streams {p99:.1f} ms "
      f"(the hold-back a paced stream adds, at most one step)")
EOF
cat "$out/capacity.txt"
echo "results in $out"
