#!/usr/bin/env bash
# The out-of-sample planner check and qlora compare's GPU columns, in one GPU call (about 4 minutes
# on an H100 80GB; published in docs/BENCHMARKS.md "Out-of-sample planner check" and docs/COMPARE.md):
#   (a) qlora compare's GPU columns: the 8 methods at the Llama-3-8B shape, seq 2048, micro-batch 1,
#       checkpointing on: peak allocated / reserved memory and the median tokens/s after 2 warm-up steps;
#   (b) the out-of-sample planner check: 12 configurations not among the 19 calibration points
#       (other shapes, sequence lengths, micro-batches, ranks, targets, DoRA, 8-bit base, no dropout),
#       two at a time (memory only), predicted vs measured peak allocated and reserved/allocated.
#
#   bash benchmarks/device_planner_check.sh OUTDIR            # on the GPU machine
#   bash benchmarks/device_planner_check.sh OUTDIR --smoke    # the same code path, tiny shape on the CPU
#
# Writes OUTDIR/compare-llama-3-8b.json, OUTDIR/oos-planner.json (+ their .log), OUTDIR/oos-configs.json
# and OUTDIR/env.txt. A configuration that fails or runs out of time is recorded in its JSON, not fatal.
# Then, on the workstation: python benchmarks/fold_planner_check.py OUTDIR
set -u
OUT=${1:?usage: device_planner_check.sh OUTDIR [--smoke]}
SMOKE=${2:-}
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
if [ "$SMOKE" = "--smoke" ]; then
  MODE=(--dry-run --steps 2 --warmup 1)
else
  MODE=(--steps 6 --warmup 2)
fi

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  $PY -c 'import bitsandbytes, transformers, peft; print("bitsandbytes", bitsandbytes.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' 2>&1 | tail -1
  $PY -c 'import qlora.models.decoder as d; print("decoder loss_chunk_tokens rule:", hasattr(d, "loss_chunk_tokens"))'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# (a) compare's GPU columns: one configuration at a time (tokens/s wants the GPU to itself)
$PY "$HERE/measure_memory.py" --shapes llama-3-8b --seqs 2048 --checkpointing on --ranks 16 \
  --methods lora-16bit qlora-nf4 qlora-fp4 qlora-nf4-no-dq rslora-r64 dora-16bit qlora-dora lora-8bit \
  "${MODE[@]}" --timeout-s 90 --deadline-s 150 --out "$OUT/compare-llama-3-8b.json" 2>&1 | tee "$OUT/compare-llama-3-8b.log"
echo "compare: exit ${PIPESTATUS[0]}"

# (b) out-of-sample planner check: none of these is one of the 19 calibration points
# (those: qwen2.5-1.5b / llama-3-8b, NF4 + double quant, all seven targets, dropout 0.05, micro-batch 1,
# r 16/64, seq 512/2048/8192). Planner's needed memory: 2.7-42 GiB each; two at once stay under 72 GiB.
cat > "$OUT/oos-configs.json" <<'JSON'
[
 {"label": "qwen 1.5b seq 4096 mb 2",            "shape": "qwen2.5-1.5b", "seq_len": 4096, "micro_batch": 2},
 {"label": "qwen 1.5b mb 4 no ckpt DoRA",        "shape": "qwen2.5-1.5b", "seq_len": 1024, "micro_batch": 4, "checkpointing": false, "dora": true},
 {"label": "qwen 1.5b r 8 q,v only",             "shape": "qwen2.5-1.5b", "seq_len": 2048, "r": 8, "targets": "q_proj,v_proj"},
 {"label": "qwen 1.5b seq 4096 no ckpt no dropout", "shape": "qwen2.5-1.5b", "seq_len": 4096, "checkpointing": false, "lora_dropout": 0.0},
 {"label": "llama-3-8b seq 4096 r 32",           "shape": "llama-3-8b", "seq_len": 4096, "r": 32},
 {"label": "llama-3-8b seq 1024 no ckpt",        "shape": "llama-3-8b", "seq_len": 1024, "checkpointing": false},
 {"label": "llama-3-8b q,v only",                "shape": "llama-3-8b", "seq_len": 2048, "targets": "q_proj,v_proj"},
 {"label": "llama-3-8b int8 seq 1024 no ckpt",   "shape": "llama-3-8b", "seq_len": 1024, "quant": "int8", "checkpointing": false},
 {"label": "llama-3-8b mb 2 no ckpt no dropout", "shape": "llama-3-8b", "seq_len": 2048, "micro_batch": 2, "checkpointing": false, "lora_dropout": 0.0},
 {"label": "mistral-7b seq 2048",                "shape": "mistral-7b", "seq_len": 2048},
 {"label": "mistral-7b seq 4096 no ckpt r 8",    "shape": "mistral-7b", "seq_len": 4096, "checkpointing": false, "r": 8},
 {"label": "qwen2.5-7b r 32",                    "shape": "qwen2.5-7b", "seq_len": 2048, "r": 32}
]
JSON
$PY "$HERE/measure_memory.py" --configs "$OUT/oos-configs.json" --jobs 2 "${MODE[@]}" \
  --timeout-s 90 --deadline-s 110 --out "$OUT/oos-planner.json" 2>&1 | tee "$OUT/oos-planner.log"
echo "out-of-sample: exit ${PIPESTATUS[0]}"
ls -l "$OUT"
exit 0
