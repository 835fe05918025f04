#!/usr/bin/env bash
# Issue 5 on the GPU: correctness of the step's pieces, then the side-by-side timing, in one call each.
#
#   bash benchmarks/device_speed.sh qwen  OUTDIR   # gpu_check + Qwen2.5-1.5B 2048 (ours, ours fused, Unsloth,
#                                                  # the seeds' stack, + Liger) + the 8-bit column of compare
#                                                  # + a kernel profile of the Llama-3-8B step
#   bash benchmarks/device_speed.sh llama OUTDIR   # gpu_check of the step + Llama-3-8B 2048 side by side
#                                                  # (a call of its own: writing the 8B checkpoint and
#                                                  # loading 4 systems takes minutes) + 8-bit column + profile
#   bash benchmarks/device_speed.sh fast OUTDIR    # gpu_check (dequant kernel, graph step, dropout), attention
#                                                  # bench, 8-bit column, Llama-3-8B 2048: qlora-bnb, qlora,
#                                                  # Unsloth, the seeds' stack
#   bash benchmarks/device_speed.sh final OUTDIR   # Llama-3-8B and Qwen2.5-1.5B 2048: qlora, the seeds'
#                                                  # stack, Unsloth (about 8 minutes)
#   bash benchmarks/device_speed.sh checks OUTDIR  # gpu_check of every part of the step, Llama-3-8B 16384
#   bash benchmarks/device_speed.sh long OUTDIR    # Llama-3-8B 16384: qlora (as run 4 of the third session)
#   bash benchmarks/device_speed.sh fused-lora OUTDIR  # checks of the step's kernels (dropout, dequantize
#                                                  # sweep), grouped (now qlora) vs qlora-ungrouped, profile
#   bash benchmarks/device_speed.sh confirm OUTDIR # seq 16384, a profile, grouped vs ungrouped (Llama)
#   bash benchmarks/device_speed.sh casts OUTDIR   # Llama 2048 qlora beside hf + profile (fewer casts)
#   bash benchmarks/device_speed.sh s5 OUTDIR      # checks of the LoRA-dropout kernels, the fused loss, the
#                                                  # graph step; Llama 2048 qlora beside hf; profile; Qwen 2048
#   bash benchmarks/device_speed.sh s6 OUTDIR      # checks of kept attention (eager and graphed); Llama 2048
#                                                  # qlora (attention kept), qlora-nokeep, the seeds' stack;
#                                                  # profiles of both; the host-memory gather probe
#   bash benchmarks/device_speed.sh s7 OUTDIR      # checks of attention kept in every / the last layer;
#                                                  # Llama-3-8B 16384 with the count the planner keeps on a
#                                                  # 24 GB GPU, beside none kept; profile with copies and
#                                                  # elementwise kernels by name
#   bash benchmarks/device_speed.sh long8k OUTDIR  # seq 8192: Llama-3-8B (qlora, qlora-nokeep, the seeds'
#                                                  # stack, Unsloth) and Qwen2.5-1.5B (+ the seeds' stack
#                                                  # with Liger)
#   bash benchmarks/device_speed.sh levers OUTDIR  # grouped projections checked and timed against qlora
#                                                  # (and the seeds' stack at Llama); a profile of Llama's
#                                                  # graph step by kind of kernel
#
# Needs the carried .site (see docs/BENCHMARKS.md "Reproduce"). Every step has its own time limit;
# a step that fails or runs out of time is recorded in the log and the next one runs.
set -u
PART=${1:?usage: device_speed.sh qwen|llama OUTDIR}
OUT=${2:?usage: device_speed.sh qwen|llama OUTDIR}
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
step() {  # step SECONDS NAME CMD...: run CMD with a limit, log it, keep going
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s)"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@"; local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
git -C "$HERE/.." rev-parse --short HEAD 2>/dev/null
case $PART in
qwen)
  step 110 gpu_check $PY "$HERE/gpu_check.py" --checks graphed,fused,dropout --out "$OUT/gpu-check.jsonl"
  step 300 qwen-2048 $PY "$HERE/train_step.py" --shapes qwen2.5-1.5b --seqs 2048 \
    --systems qlora,qlora-unfused,unsloth,hf,hf+liger --steps 12 --warmup 4 --out "$OUT/qwen" --deadline 280
  step 60 compare-8bit $PY "$HERE/measure_memory.py" --shapes llama-3-8b --seqs 2048 --checkpointing on \
    --ranks 16 --steps 6 --warmup 2 --methods lora-8bit --out "$OUT/compare-8bit.json"
  step 75 profile-llama $PY "$HERE/profile_step.py" --shape llama-3-8b --seq 2048 --ours --fused --steps 2 \
    --out /tmp/profile
  ;;
llama)
  step 60 gpu_check $PY "$HERE/gpu_check.py" --checks graphed,dropout --out "$OUT/gpu-check.jsonl"
  step 420 llama-2048 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 2048 \
    --systems qlora,unsloth,hf,hf+liger --no-qlora-ckpt-off --steps 10 --warmup 3 \
    --out "$OUT/llama" --deadline 400
  step 45 compare-8bit $PY "$HERE/measure_memory.py" --shapes llama-3-8b --seqs 2048 --checkpointing on \
    --ranks 16 --steps 6 --warmup 2 --methods lora-8bit --out "$OUT/compare-8bit.json"
  step 60 profile-llama $PY "$HERE/profile_step.py" --shape llama-3-8b --seq 2048 --ours --fused --steps 2 \
    --out /tmp/profile
  ;;
fast)  # the 4-bit base through our Triton dequantize + the LoRA product added in the GEMM (run 3 of
      # the third session ran "qlora,qlora-fast", which are today's qlora-bnb and qlora)
  step 60 gpu_check $PY "$HERE/gpu_check.py" --checks graphed,dequant,dropout --out "$OUT/gpu-check.jsonl"
  step 40 attention $PY "$HERE/attention_bench.py"
  step 40 compare-8bit $PY "$HERE/measure_memory.py" --shapes llama-3-8b --seqs 2048 --checkpointing on \
    --ranks 16 --steps 6 --warmup 2 --methods lora-8bit --out "$OUT/compare-8bit.json"
  step 300 llama-2048 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 2048 \
    --systems qlora-bnb,qlora,unsloth,hf --no-qlora-ckpt-off --steps 10 --warmup 3 \
    --out "$OUT/llama" --deadline 290
  ;;
final)  # the step as qlora train now runs it, side by side with the seeds' stack and Unsloth, both shapes
  # (limits from the third session's run 4, whose deadlines were too tight for the seeds' stack:
  # the 8B checkpoint ~26 s, each system ~40 s, Unsloth ~100 s with its compile, Qwen's Unsloth ~60 s)
  # (the checks run in a call of their own: `checks`, below)
  # (qlora-nokeep: attention rerun, as qlora train runs where keeping it does not fit)
  step 300 llama-2048 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 2048 \
    --systems qlora,qlora-nokeep,hf,unsloth --no-qlora-ckpt-off --steps 10 --warmup 3 --out "$OUT/llama" \
    --deadline 290
  # (Qwen's deadline raised from 180 s after the sixth session's run 9, where the two profiled
  # steps each system now adds (gpu_busy_ms) left Unsloth's compile without time)
  step 240 qwen-2048 $PY "$HERE/train_step.py" --shapes qwen2.5-1.5b --seqs 2048 \
    --systems qlora,hf,unsloth --steps 12 --warmup 4 --out "$OUT/qwen" --deadline 230
  ;;
checks)  # every check of the step's parts, then Llama-3-8B at 16384 (the call beside `final`)
  step 230 gpu_check $PY "$HERE/gpu_check.py" \
    --checks dropout,cross,graphed,fused,dequant_kernel,grouped,kept_attention,host_embedding,train_defaults \
    --out "$OUT/gpu-check.jsonl"
  # qlora-nokeep is what qlora train ran on a 24 GB GPU until the seventh session (now: the last
  # 15 layers keep it, part s7)
  step 150 llama-16384 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 16384 \
    --systems qlora-nokeep,qlora --no-qlora-ckpt-off --long-steps 4 --warmup 1 --out "$OUT/llama-16k" \
    --deadline 145
  ;;
long)  # Llama-3-8B at seq 16384 with the step qlora train runs
  step 90 llama-16384 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 16384 --systems qlora \
    --no-qlora-ckpt-off --long-steps 4 --warmup 1 --out "$OUT/llama-16k" --deadline 85
  ;;
levers)  # the grouped projections timed against qlora beside the seeds' stack; where Llama's graph
         # step goes (GPU time by kind of kernel)
  step 80 gpu_check $PY "$HERE/gpu_check.py" --checks graphed,fused,dequant,grouped --out "$OUT/gpu-check.jsonl"
  step 260 llama-2048 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 2048 \
    --systems qlora,qlora-ungrouped,hf --no-qlora-ckpt-off --steps 10 --warmup 3 --out "$OUT/llama" --deadline 250
  step 75 profile-llama $PY "$HERE/profile_step.py" --shape llama-3-8b --seq 2048 --ours --graphs --fused --fast \
    --steps 2 --out /tmp/profile
  step 110 qwen-2048 $PY "$HERE/train_step.py" --shapes qwen2.5-1.5b --seqs 2048 \
    --systems qlora,qlora-ungrouped --steps 12 --warmup 4 --out "$OUT/qwen" --deadline 100
  ;;
fused-lora)  # LoRA products as one autograd function (kernels/lora.py), 8-mask Philox dropout, the
             # dequantize launch swept; qlora vs qlora-grouped; where the graph step goes now
  step 90 gpu_check $PY "$HERE/gpu_check.py" --checks dropout,dequant,graphed,grouped,fused \
    --out "$OUT/gpu-check.jsonl"
  step 170 llama-2048 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 2048 \
    --systems qlora,qlora-ungrouped --no-qlora-ckpt-off --steps 10 --warmup 3 --out "$OUT/llama" --deadline 160
  step 60 profile-llama $PY "$HERE/profile_step.py" --shape llama-3-8b --seq 2048 --ours --graphs --fused \
    --fast --group --steps 2 --out /tmp/profile
  step 100 qwen-2048 $PY "$HERE/train_step.py" --shapes qwen2.5-1.5b --seqs 2048 \
    --systems qlora,qlora-ungrouped --steps 12 --warmup 4 --out "$OUT/qwen" --deadline 90
  ;;
confirm)  # after final: seq 16384 with today's step, where the H100 step goes now, grouping on vs off
  step 90 llama-16384 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 16384 --systems qlora \
    --no-qlora-ckpt-off --long-steps 4 --warmup 1 --out "$OUT/llama-16k" --deadline 85
  step 60 profile-llama $PY "$HERE/profile_step.py" --shape llama-3-8b --seq 2048 --ours --graphs --fused \
    --fast --group --steps 2 --out /tmp/profile
  step 170 llama-2048 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 2048 \
    --systems qlora,qlora-ungrouped --no-qlora-ckpt-off --steps 10 --warmup 3 --out "$OUT/llama" --deadline 160
  ;;
s5)  # fifth session: dropout masks drawn inside the LoRA products, the loss's gradient made in its
    # forward, the checkpoint rerun's dense weights kept for the layer's backward
  step 150 gpu_check $PY "$HERE/gpu_check.py" --checks lora_dropout,graphed,grouped,dequant_kernel \
    --out "$OUT/gpu-check.jsonl"
  step 170 llama-2048 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 2048 \
    --systems qlora,hf --no-qlora-ckpt-off --steps 10 --warmup 3 --out "$OUT/llama" --deadline 160
  step 60 profile-llama $PY "$HERE/profile_step.py" --shape llama-3-8b --seq 2048 --ours --graphs --fused \
    --fast --group --steps 2 --out /tmp/profile
  step 90 qwen-2048 $PY "$HERE/train_step.py" --shapes qwen2.5-1.5b --seqs 2048 \
    --systems qlora --steps 12 --warmup 4 --out "$OUT/qwen" --deadline 80
  ;;
s6)  # sixth session: attention kept from each layer's forward to its backward (keep_attention)
  step 170 gpu_check $PY "$HERE/gpu_check.py" --checks kept_attention,graphed,fused --out "$OUT/gpu-check.jsonl"
  step 200 llama-2048 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 2048 \
    --systems qlora,qlora-nokeep,hf --no-qlora-ckpt-off --steps 10 --warmup 3 --out "$OUT/llama" --deadline 190
  step 60 profile-llama-keep $PY "$HERE/profile_step.py" --shape llama-3-8b --seq 2048 --ours --graphs --fused \
    --fast --group --keep-attention --steps 2 --out /tmp/profile-keep
  step 40 host-gather $PY "$HERE/host_gather_probe.py"
  ;;
s7)  # seventh session: attention kept in the last N layers where only N fit (keep_attention N)
  step 150 gpu_check $PY "$HERE/gpu_check.py" --checks kept_attention,train_defaults --out "$OUT/gpu-check.jsonl"
  # the count qlora train keeps on a 24 GB GPU at 16384 tokens, as the planner answers it
  N=$(PYTHONPATH="$HERE/../src:${PYTHONPATH:-}" $PY -m qlora.cli plan --shape llama-3-8b --seq-len 16384 \
      --gpu-memory 24GB | sed -n 's/.*in the last \([0-9]*\) of 32 layers.*/\1/p')
  echo "=== plan: attention kept in the last ${N:-(none)} layers at 16384 on a 24 GB GPU"
  step 200 llama-16384-planned $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 16384 \
    --systems qlora,qlora-nokeep --keep-attention "${N:-0}" --no-qlora-ckpt-off --long-steps 5 --warmup 1 \
    --out "$OUT/llama-16k" --model-root /tmp/models --deadline 195
  step 70 profile-llama-detail $PY "$HERE/profile_step.py" --shape llama-3-8b --seq 2048 --ours --graphs \
    --fused --fast --group --keep-attention --steps 2 --detail copy,elementwise,other --out /tmp/profile
  ;;
long8k)  # the issue's second configuration, seq 8192 micro-batch 1, on the sixth session's step
  step 300 llama-8192 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 8192 \
    --systems qlora,qlora-nokeep,hf,unsloth --no-qlora-ckpt-off --long-steps 6 --warmup 2 \
    --out "$OUT/llama" --deadline 290
  step 230 qwen-8192 $PY "$HERE/train_step.py" --shapes qwen2.5-1.5b --seqs 8192 \
    --systems qlora,hf,hf+liger,unsloth --long-steps 8 --warmup 2 --out "$OUT/qwen" --deadline 220
  ;;
casts)  # LoraProducts with the scale on A's cast and B cast into its block diagonal (fewer small
        # kernels); Llama 2048 beside the seeds' stack, and the profile
  step 50 gpu_check $PY "$HERE/gpu_check.py" --checks dequant,grouped --out "$OUT/gpu-check.jsonl"
  step 170 llama-2048 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 2048 \
    --systems qlora,hf --no-qlora-ckpt-off --steps 10 --warmup 3 --out "$OUT/llama" --deadline 160
  step 45 profile-llama $PY "$HERE/profile_step.py" --shape llama-3-8b --seq 2048 --ours --graphs --fused \
    --fast --group --steps 2 --out /tmp/profile
  ;;
esac
