#!/usr/bin/env bash
# First a correctness check of the single-pass engine on the GPU (bench/engine_check.py: single pass vs full
# passes, fused span kernels vs torch ops, also on the 8B shape); then speed of head scoring on one GPU, for a
# random-weight model of Llama-3.1-8B's shape (bf16, byte-level tokenizer): per-method time and peak memory at
# ~2k/8k/16k/32k-token prompts (full with the fused kernels and with torch ops, same run), throughput of
# SmolLM2-135M's shape at 1, 4 and 16 prompts per pass, a kernel profile of full vs bare, then the 8B shape's
# throughput at 20 and 100 candidates with 1 and 4 prompts per pass, with the share of time the GPU is busy.
# Installs nothing; needs torch + transformers (>= 5) with CUDA (and Triton, as torch's CUDA wheels bring it).
# Run from the repo root:
#
#     OUT=/some/dir bash bench/gpu_speed.sh        # JSON under $OUT (default results/speed)
#
# Overrides (a dry run on CPU: MODEL=random:tiny SMALL=random:tiny DEVICE=cpu TOKENS="256 512" QUERIES=2 BIG=tiny:600):
# MODEL, SMALL, DEVICE, TOKENS, QUERIES, BIG, PROFILE, SERVICE_SECONDS, PYTHON.
#
# About 6-8 minutes on an H100 (model build ~1 s per step on the GPU; eager is expected to run out of memory from
# 8k tokens on: ~L*H*T^2 bf16 attentions). Each step writes its JSON as it goes, so a step cut short by its
# timeout keeps the sizes it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
OUT=${OUT:-results/speed}
mkdir -p "$OUT"
MODEL=${MODEL:-random:llama-3.1-8b}
SMALL=${SMALL:-random:smollm2-135m}
DEVICE=${DEVICE:-cuda}
TOKENS=${TOKENS:-2048 8192 16384 32768}
QUERIES=${QUERIES:-8}
BIG=${BIG:-llama-3.1-8b:2048 llama-3.1-8b:16384}
PROFILE=${PROFILE:-8192 32768}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu_nvidia_smi.csv" 2>&1 || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')" \
  2>&1 | tee "$OUT/gpu_versions.txt"

echo "== engine check: single pass vs separate full passes, fused kernels vs torch ops on $DEVICE"
# shellcheck disable=SC2086  # BIG is a list
timeout 180 "$PY" bench/engine_check.py --device "$DEVICE" --big $BIG 2>&1 | tee "$OUT/gpu_engine_check.txt" | tail -9

echo "== sizes: bare / full (ICR's pass, fused) / full_per_head / full_torch / routed / eager at $TOKENS tokens ($MODEL on $DEVICE)"
# shellcheck disable=SC2086  # TOKENS is a list
timeout 240 "$PY" bench/speed.py --model "$MODEL" --device "$DEVICE" --tokens $TOKENS \
  --methods bare full full_per_head full_torch routed eager \
  --repeats 3 --warmup 1 --json --out "$OUT/gpu_llama8b_sizes.json" \
  > "$OUT/gpu_llama8b_sizes.stdout" 2> "$OUT/gpu_llama8b_sizes.stderr"
echo "sizes rc=$?"; tail -3 "$OUT/gpu_llama8b_sizes.stderr"

echo "== throughput of a small model (SmolLM2-135M's shape): where launches, not FLOPs, bound a GPU"
timeout 90 "$PY" bench/speed.py --model "$SMALL" --device "$DEVICE" --no-methods --throughput \
  --candidates 20 100 --queries 16 --throughput-methods full static16 routed --batch-sizes 1 4 16 --json \
  --out "$OUT/gpu_smollm2_throughput.json" \
  > "$OUT/gpu_smollm2_throughput.stdout" 2> "$OUT/gpu_smollm2_throughput.stderr"
echo "small throughput rc=$?"; tail -3 "$OUT/gpu_smollm2_throughput.stderr"

echo "== service: POST /v1/rerank, 5 docs x 50 words, 1 and 16 clients, batching on vs off ($SMALL on $DEVICE)"
if "$PY" -c "import fastapi, uvicorn, httpx" 2>/dev/null; then
  timeout 120 "$PY" bench/service.py --model "$SMALL" --device "$DEVICE" --data examples/scifact-mini \
    --clients 1 16 --seconds "${SERVICE_SECONDS:-10}" --out "$OUT/gpu_service_5x50.json" > "$OUT/gpu_service.txt" 2>&1
  echo "service rc=$?"; grep batching "$OUT/gpu_service.txt"
else
  echo "service skipped: fastapi/uvicorn/httpx not installed here"
fi

echo "== profile: where full's time above bare goes, by kernel ($MODEL at $PROFILE tokens)"
# shellcheck disable=SC2086  # PROFILE is a list
timeout 120 "$PY" bench/gpu_profile.py --model "$MODEL" --tokens $PROFILE --json "$OUT/gpu_llama8b_profile.json" \
  > "$OUT/gpu_llama8b_profile.txt" 2>&1
echo "profile rc=$?"; head -40 "$OUT/gpu_llama8b_profile.txt"

echo "== throughput: 20 and 100 candidates (~170 tokens each), $QUERIES queries, 1 and 4 prompts per pass"
timeout 150 "$PY" bench/speed.py --model "$MODEL" --device "$DEVICE" --no-methods --throughput \
  --candidates 20 100 --queries "$QUERIES" --throughput-methods full static16 routed --batch-sizes 1 4 --json \
  --out "$OUT/gpu_llama8b_throughput.json" \
  > "$OUT/gpu_llama8b_throughput.stdout" 2> "$OUT/gpu_llama8b_throughput.stderr"
echo "throughput rc=$?"; tail -3 "$OUT/gpu_llama8b_throughput.stderr"

"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("gpu_llama8b_sizes.json", "gpu_llama8b_throughput.json", "gpu_smollm2_throughput.json"):
    p = out / name
    if not p.exists():
        print(name, "missing"); continue
    d = json.loads(p.read_text())
    for r in d.get("runs", []):
        print(f"{r['prompt_tokens']:>6} tok  bare {r.get('bare_s')}  full/bare {r.get('full_over_bare')}  "
              f"full_torch/bare {r.get('full_torch_over_bare')}  "
              f"routed/full {r.get('routed_over_full')}  eager/bare {r.get('eager_over_bare')}  "
              f"mem full/bare {r.get('peak_mem_over_bare')}  peak MB {r.get('peak_mem_mb')}")
    for c, row in d.get("throughput", {}).items():
        if isinstance(row, dict):
            print(name.split("_")[1], c, "cand:", "  ".join(f"{k} {v['qps']:.2f} q/s busy {v.get('gpu_busy')}"
                                                         for k, v in row.items()))
PYEOF
