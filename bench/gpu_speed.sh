#!/usr/bin/env bash
# First a correctness check of the single-pass engine on the GPU (bench/engine_check.py); then speed of head
# scoring on one GPU, for a random-weight model of Llama-3.1-8B's shape (bf16, byte-level tokenizer):
# per-method time and peak memory at ~2k/8k/16k/32k-token prompts, then throughput at 20 and 100 candidates with
# 1 and 4 prompts per pass (and for SmolLM2-135M's shape, 1, 4 and 16), with the share of time the GPU is busy. Installs nothing; needs torch + transformers (>= 5) with CUDA. Run from the repo root:
#
#     OUT=/some/dir bash bench/gpu_speed.sh        # JSON under $OUT (default results/speed)
#
# Overrides (for a dry run of this script on CPU: MODEL=random:tiny SMALL=random:tiny DEVICE=cpu TOKENS="256 512" QUERIES=2):
# MODEL, SMALL, DEVICE, TOKENS, QUERIES, PYTHON.
#
# About 3-5 minutes on an H100 (model build ~1 s per step on the GPU; eager is expected to run out of memory from
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

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu_nvidia_smi.csv" 2>&1 || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')" \
  2>&1 | tee "$OUT/gpu_versions.txt"

echo "== engine check: single pass vs separate full passes on $DEVICE (tiny models, fp32 + bf16)"
timeout 60 "$PY" bench/engine_check.py --device "$DEVICE" 2>&1 | tee "$OUT/gpu_engine_check.txt" | tail -7

echo "== sizes: bare / full / static16 / routed / eager at $TOKENS tokens ($MODEL on $DEVICE)"
# shellcheck disable=SC2086  # TOKENS is a list
timeout 150 "$PY" bench/speed.py --model "$MODEL" --device "$DEVICE" --tokens $TOKENS \
  --repeats 3 --warmup 1 --json --out "$OUT/gpu_llama8b_sizes.json" \
  > "$OUT/gpu_llama8b_sizes.stdout" 2> "$OUT/gpu_llama8b_sizes.stderr"
echo "sizes rc=$?"; tail -3 "$OUT/gpu_llama8b_sizes.stderr"

echo "== throughput: 20 and 100 candidates (~170 tokens each), $QUERIES queries, 1 and 4 prompts per pass"
timeout 150 "$PY" bench/speed.py --model "$MODEL" --device "$DEVICE" --no-methods --throughput \
  --candidates 20 100 --queries "$QUERIES" --throughput-methods full static16 routed --batch-sizes 1 4 --json \
  --out "$OUT/gpu_llama8b_throughput.json" \
  > "$OUT/gpu_llama8b_throughput.stdout" 2> "$OUT/gpu_llama8b_throughput.stderr"
echo "throughput rc=$?"; tail -3 "$OUT/gpu_llama8b_throughput.stderr"

echo "== throughput of a small model (SmolLM2-135M's shape): where launches, not FLOPs, bound a GPU"
timeout 90 "$PY" bench/speed.py --model "$SMALL" --device "$DEVICE" --no-methods --throughput \
  --candidates 20 100 --queries 16 --throughput-methods full static16 routed --batch-sizes 1 4 16 --json \
  --out "$OUT/gpu_smollm2_throughput.json" \
  > "$OUT/gpu_smollm2_throughput.stdout" 2> "$OUT/gpu_smollm2_throughput.stderr"
echo "small throughput rc=$?"; tail -3 "$OUT/gpu_smollm2_throughput.stderr"

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
              f"routed/full {r.get('routed_over_full')}  eager/bare {r.get('eager_over_bare')}  "
              f"mem full/bare {r.get('peak_mem_over_bare')}  peak MB {r.get('peak_mem_mb')}")
    for c, row in d.get("throughput", {}).items():
        if isinstance(row, dict):
            print(name.split("_")[1], c, "cand:", "  ".join(f"{k} {v['qps']:.2f} q/s busy {v.get('gpu_busy')}"
                                                         for k, v in row.items()))
PYEOF
