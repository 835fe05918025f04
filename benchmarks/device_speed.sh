#!/usr/bin/env bash
# One GPU call per published figure of docs/BENCHMARKS.md ("Current figures" names the configuration
# each figure came from). Run on the GPU machine, from the repository root:
#
#   bash benchmarks/device_speed.sh CONFIG OUTDIR
#
# CONFIG (each about 4-9 minutes on an H100 80GB):
#   speed-2048    Llama-3-8B and Qwen2.5-1.5B at seq 2048, micro-batch 1, side by side: qlora (attention
#                 kept), qlora-nokeep, the seeds' stack (hf), Unsloth at Llama; qlora, hf, Unsloth at
#                 Qwen (+ qlora without checkpointing). tokens/s, GPU time per step, peak memory, loss.
#   speed-8192    the same at seq 8192: Llama-3-8B (qlora, qlora-nokeep, hf, Unsloth) and Qwen2.5-1.5B
#                 (qlora, hf, hf + Liger, Unsloth).
#   long-16384    Llama-3-8B at seq 16384 as `qlora train` runs it on a 24 GB GPU: attention kept in
#                 the last N layers, N as `qlora plan --gpu-memory 24GB` answers it, beside none kept.
#   long-context  Llama-3-8B at 32768 and 65536 tokens (then 131072, ours only) under a 23 GiB allocator
#                 cap in every worker (a 24 GB GPU), qlora as `qlora train` picks it on a 24 GB GPU
#                 (offload, MLP tiles, kept attention: auto) beside Unsloth. At most 8.5 minutes.
#   longest-24, longest-48, longest-80 (and longest-48-unsloth, longest-80-unsloth)
#                 the longest Llama-3-8B row each system trains on a 24 GB card (23 GiB allocator
#                 cap), a 48 GB card (46 GiB cap) and an 80 GB one (79 GiB cap: the whole of an
#                 H100 80GB, an H200's 80 GB share): qlora at the longest
#                 length whose allocated peak the planner fits there, tightly (offload, 4096-token
#                 MLP tiles, no attention kept, expandable segments; one step, no warm-up: a step
#                 is minutes), and Unsloth up a ladder of lengths in one worker (each recorded, out
#                 of memory too). Each part is one call of at most ~9.5 minutes. The host bounds
#                 offload as well: the inputs are pinned at their size (speed/offload.page_locked),
#                 31 x tokens x 8 KiB: 77.5 GiB at 327,680 (longest-48), 93 GiB at 393,216
#                 (longest-80), which a 128 GiB host holds (qlora train refuses, before loading,
#                 what it cannot: train_step.py records that refusal in seconds). Step times by
#                 the 262,144-token step's 199 s and attention's square: ~5 and ~7.5 minutes.
#   moe           Mixtral-8x7B at seq 2048 under a 37.25 GiB cap (40 GB), r16 on attention and every
#                 expert, random weights drawn and quantized on the GPU, graphed (qlora) and eager
#                 (qlora-eager). About 6 minutes.
#   moe-graphs    gpu_check.py --checks moe (tiny Mixtral and Qwen3-MoE steps captured against eager,
#                 the stack dequantize at real shapes, whole and in parts), then Qwen3-30B-A3B at
#                 seq 2048 under a 22.35 GiB cap (a 24 GB card), graphed (qlora) and eager
#                 (qlora-eager). About 6 minutes.
#   moe-peers     (OUTDIR then SYSTEMS; LIMIT, WORKER_TIMEOUT, STEPS, WARMUP, CAP, CKPT_OFF, SHAPE
#                 from the environment)
#                 Qwen3-30B-A3B at seq 2048 for SYSTEMS (default qlora,hf; then unsloth) from a
#                 random checkpoint in /dev/shm (61 GB: the disk is 64 GB, the host's RAM 128 GiB),
#                 written by the first call and read by the next ones while the machine stays warm
#                 (chain the calls: it is gone once the machine is given back). No cap: the seeds'
#                 stack keeps the experts in bf16 (54 GiB). One call per system, ~9.5 minutes each.
#   profile-2048  where the Llama-3-8B graph step's GPU time goes at seq 2048 (profile_step.py, kernels
#                 by kind; copies, elementwise and other kernels by name).
#   profile-phi4  the same for Phi-4 (14B): where the 12 ms a step off the GPU go.
#   profile-moe   the same for Qwen3-30B-A3B's eager MoE step (no graphs, no kept attention): where
#                 its 0.89 s a step go (host syncs show among the host-side ops).
#   checks        gpu_check.py: every part of the step against its reference on the GPU.
#   triton-experts
#                 the experts' Triton grouped GEMM (what GPUs below sm90 and fp16 run), timed on
#                 this GPU: grouped_gemm.py (each path's ms, memory and error at Qwen3-30B-A3B's
#                 GEMMs, balanced and unbalanced), then Qwen3-30B-A3B's step under the 24 GB cap
#                 on it beside torch._grouped_mm's (qlora-triton-experts, qlora), then the MoE
#                 correctness checks (gpu_check.py --checks moe: the kernel compiled, and replayed
#                 in a CUDA graph). About 8 minutes.
#   families      the families' shapes at seq 2048, micro-batch 1, all linears r16, checkpointing:
#                 Gemma-2-9B (qlora with attention kept, qlora-nokeep, hf, Unsloth) and Phi-4 14B
#                 (qlora, hf, Unsloth); StableLM-2-1.6B, a family with no native module, on the
#                 generic path (qlora vs hf). About 9 minutes: the random checkpoints take ~30 s
#                 (Gemma) and ~50 s (Phi-4, 29 GB) to write, each system ~40-80 s to load,
#                 Unsloth more with its compile; a system the deadline leaves out is recorded as
#                 skipped (rerun that shape alone with --systems). Unsloth's compiled Gemma 2 step
#                 fails on torch 2.11: families-gemma-unsloth measures it with that compile off.
#   families-gemma-unsloth
#                 Gemma-2-9B at seq 2048 as families runs it: qlora, then unsloth-nocompile (Unsloth
#                 with its per-layer compile off, UNSLOTH_BLOCK_COMPILE=0: what a torch 2.11 user
#                 falls back to; slower than Unsloth compiled, reported beside it), then unsloth
#                 compiled (its failure recorded beside; the deadline cuts it first). Its own call:
#                 families has no room left. About 6 minutes (checkpoint ~30 s, qlora ~70 s, each
#                 Unsloth ~45 s to load, then its compile or its eager steps).
#   phi4-keepacts Phi-4 at seq 2048 beside both peers: qlora, then qlora with its last N layers
#                 left out of the checkpoint (N from the environment, default 26: the most whose
#                 plan stays under the seeds' stack's measured 15.63 GiB), Unsloth, hf. ~5 minutes.
#   dpo           a DPO step (preference_step.py): prompt 512 + completions of 512, 4 pairs, reference
#                 = adapters off; qlora (pairs packed into one row, CUDA graphs), TRL's DPOTrainer on
#                 the seeds' stack, Unsloth's PatchDPOTrainer at Llama-3-8B and Qwen2.5-1.5B (Qwen:
#                 qlora-eager too, graphs off, for the graphs' gain); then Qwen with
#                 ragged completions (128-512 tokens), qlora packed beside padded. pairs/s, tokens/s,
#                 peak memory.
#   orpo          the same step for ORPO (preference_step.py --method orpo, lambda 0.1, no reference
#                 forward): qlora (packed, CUDA graphs), TRL's ORPOTrainer on the seeds' stack,
#                 Unsloth's PatchDPOTrainer + ORPOTrainer at Llama-3-8B and Qwen2.5-1.5B (Qwen:
#                 qlora-eager too). About 8 minutes.
#                 TRL's NLL covers the prompt too, ours the completion only (preference_step.py).
#   dpo-8b, orpo-8b
#                 the Llama-3-8B part of dpo / orpo alone: qlora, qlora-nockpt (checkpointing off,
#                 one pair a forward, the 4 pairs accumulated: no recompute, at about qlora's
#                 memory), Unsloth, TRL. About 9.5 minutes each.
#   kto           gpu_check.py --checks preference (KTO's graphed step against its eager one among
#                 them, qlora train's DPO and KTO end to end), then a KTO step at Qwen2.5-1.5B,
#                 graphed, eager and TRL's KTOTrainer. About 5 minutes, 7.5 at most.
#   export-8b     the user's `qlora export --gguf --model M --adapter A --out F --type T --check` on a
#                 random Llama-3-8B checkpoint and a random r16 adapter (export_check.py): f16 (the
#                 check's noise floor), q4_k_m, the same q4_k_m made by llama.cpp's own quantizer from
#                 our f16 file and checked the same way (RMS against the f16 values over blocks 0
#                 and 31), then q8_0 if time is left: seconds (export, check), peak host RSS, file
#                 size, the check's parity table in llama.cpp. The checkpoint takes ~60 s to write
#                 (kept in /tmp/export-check for a second call on a warm machine); each GGUF is
#                 deleted once nothing reads it (disk). ~9 minutes by today's figures (checkpoint
#                 60, f16 ~95, q4_k_m 92, llama.cpp's q4_k_m ~110, q8_0 161 s): q8_0 runs last
#                 and is skipped or cut at the deadline when its export is still slow; then
#                 export-8b-q8 on the warm machine measures it alone. llama-cpp-python comes as
#                 .whl/llamacpp.tar.xz (carried; extracted to /tmp/llamacpp, put on PYTHONPATH);
#                 gguf from .site.
#   export-8b-q8  q8_0 alone, as export-8b does it (the checkpoint reused when the machine is warm).
#   export-8b-ours q4_k_m then q8_0 by our quantizer alone (no f16 row, no llama.cpp peer): the
#                 user's two common exports at 8B, timed, in about 4 minutes.
#   export-8b-cpu q4_k_m and q8_0 with the GPU left out (--device cpu: the export's 16 worker
#                 processes, the check's reference on the CPU too): the issue's "8B to q4_k_m
#                 in under 90 s on a 16-core machine", end to end, without a GPU.
#   export-8b-cpu-q8 q8_0 alone with the GPU left out: the check's reference on the CPU, the whole
#                 model where the host holds its 31.4 GiB (else a layer at a time; the table
#                 says which). The streamed one alone: benchmarks/reference_rss.py.
#
# Needs the carried .site (see docs/BENCHMARKS.md "Reproduce"). Every step has its own time limit;
# a step that fails or runs out of time is recorded in the log and the next one runs. Results go to
# OUTDIR/<part>/results.jsonl (train_step.py, preference_step.py), OUTDIR/gpu-check.jsonl, and the
# profile to stdout.
set -u
USAGE="usage: device_speed.sh speed-2048|speed-8192|long-16384|long-context|longest-24|longest-48|longest-48-unsloth|longest-80|longest-80-unsloth|moe|moe-graphs|moe-peers|profile-2048|profile-phi4|profile-moe|checks|triton-experts|families|families-gemma-unsloth|phi4-keepacts|dpo|orpo|dpo-8b|orpo-8b|kto|export-8b|export-8b-q8|export-8b-ours|export-8b-cpu|export-8b-cpu-q8 OUTDIR [SYSTEMS: moe-peers only]"
PART=${1:?$USAGE}
OUT=${2:?$USAGE}
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
speed-2048)  # Llama's 8B checkpoint ~26 s to write, each system ~40 s, Unsloth ~100 s with its compile;
             # Qwen's deadline leaves Unsloth's compile time beside the two profiled steps (gpu_busy_ms)
  step 300 llama-2048 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 2048 \
    --systems qlora,qlora-nokeep,hf,unsloth --no-qlora-ckpt-off --steps 10 --warmup 3 --out "$OUT/llama" \
    --deadline 290
  step 240 qwen-2048 $PY "$HERE/train_step.py" --shapes qwen2.5-1.5b --seqs 2048 \
    --systems qlora,hf,unsloth --steps 12 --warmup 4 --out "$OUT/qwen" --deadline 230
  ;;
speed-8192)
  step 300 llama-8192 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 8192 \
    --systems qlora,qlora-nokeep,hf,unsloth --no-qlora-ckpt-off --long-steps 6 --warmup 2 \
    --out "$OUT/llama" --deadline 290
  step 230 qwen-8192 $PY "$HERE/train_step.py" --shapes qwen2.5-1.5b --seqs 8192 \
    --systems qlora,hf,hf+liger,unsloth --long-steps 8 --warmup 2 --out "$OUT/qwen" --deadline 220
  ;;
long-16384)
  # the count qlora train keeps on a 24 GB GPU at 16384 tokens, as the planner answers it
  N=$(PYTHONPATH="$HERE/../src:${PYTHONPATH:-}" $PY -m qlora.cli plan --shape llama-3-8b --seq-len 16384 \
      --gpu-memory 24GB | sed -n 's/.*in the last \([0-9]*\) of 32 layers.*/\1/p')
  echo "=== plan: attention kept in the last ${N:-(none)} layers at 16384 on a 24 GB GPU"
  step 200 llama-16384-planned $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 16384 \
    --systems qlora,qlora-nokeep --keep-attention "${N:-0}" --no-qlora-ckpt-off --long-steps 5 --warmup 1 \
    --out "$OUT/llama-16k" --model-root /tmp/models --deadline 195
  ;;
long-context)
  # what `qlora train` picks at each length on a 24 GB GPU, as the planner answers it
  for SEQ in 32768 65536 131072; do
    PYTHONPATH="$HERE/../src:${PYTHONPATH:-}" $PY -m qlora.cli plan --shape llama-3-8b --seq-len $SEQ \
      --gpu-memory 24GB --offload-activations --tile-mlp | tail -4
  done
  # 8B checkpoint ~30 s; qlora ~40 s to load, each length a capture (3 runs) + 2 timed steps;
  # Unsloth ~100 s with its compile. The worker limit keeps one system's hang from eating the rest.
  step 320 llama-long $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 32768,65536 \
    --systems qlora,unsloth --memory-cap-gib 23 --plan-gpu-memory 24GB \
    --offload-activations auto --tile-mlp auto --keep-attention auto --no-qlora-ckpt-off \
    --long-steps 3 --warmup 1 --no-gpu-busy --worker-timeout 200 --model-root /tmp/models \
    --out "$OUT/llama-long" --deadline 310
  # past Unsloth's published 78,475 tokens on 24 GB: ours only, if the cap holds it; eager (a
  # graph's capture is three steps of ~45 s here, and saves nothing at this length)
  step 180 llama-131072 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 131072 \
    --systems qlora-eager --memory-cap-gib 23 --plan-gpu-memory 24GB --offload-activations true \
    --tile-mlp true --keep-attention 0 --no-qlora-ckpt-off --long-steps 2 --warmup 1 --no-gpu-busy \
    --worker-timeout 170 --model-root /tmp/models --out "$OUT/llama-128k" --deadline 175
  ;;
longest-24)  # planned peak allocated 22.27 GiB at 163,840 (qlora plan --seq-len 163840 --offload-activations --tile-mlp --keep-attention 0)
  # a tight fit: expandable segments, as the plan's warning advises, for both systems alike
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  step 230 qlora-163840-23gib $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 163840 \
    --systems qlora-eager --memory-cap-gib 23 --offload-activations true --tile-mlp true \
    --keep-attention 0 --no-qlora-ckpt-off --long-steps 1 --warmup 0 --no-gpu-busy --random-weights \
    --worker-timeout 225 --deadline 228 --out "$OUT/qlora-24"
  step 320 unsloth-ladder-23gib $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 49152,57344,65536 \
    --systems unsloth --memory-cap-gib 23 --no-qlora-ckpt-off --long-steps 1 --warmup 0 --no-gpu-busy \
    --worker-timeout 300 --model-root /tmp/models --out "$OUT/unsloth-24" --deadline 315
  ;;
longest-48)  # planned 39.73 GiB at 327,680 (a tight fit under 46 GiB); 77.5 GiB pinned
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step 570 qlora-327680-46gib $PY "$HERE/train_step.py" \
    --shapes llama-3-8b --seqs 327680 --systems qlora-eager --memory-cap-gib 46 --offload-activations true \
    --tile-mlp true --keep-attention 0 --no-qlora-ckpt-off --long-steps 1 --warmup 0 --no-gpu-busy \
    --random-weights --worker-timeout 560 --deadline 565 --out "$OUT/qlora-48"
  ;;
longest-48-unsloth)
  step 400 unsloth-ladder-46gib $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 98304,131072,163840 \
    --systems unsloth --memory-cap-gib 46 --no-qlora-ckpt-off --long-steps 1 --warmup 0 --no-gpu-busy \
    --worker-timeout 390 --model-root /tmp/models --out "$OUT/unsloth-48" --deadline 395
  ;;
longest-80)  # planned 46.72 GiB at 393,216; 93 GiB pinned
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True step 580 qlora-393216 $PY "$HERE/train_step.py" \
    --shapes llama-3-8b --seqs 393216 --systems qlora-eager --memory-cap-gib 79 --offload-activations true \
    --tile-mlp true --keep-attention 0 --no-qlora-ckpt-off --long-steps 1 --warmup 0 --no-gpu-busy \
    --random-weights --worker-timeout 575 --deadline 578 --out "$OUT/qlora-80"
  ;;
longest-80-unsloth)  # Unsloth publishes 342,733 tokens on 80 GB for Llama-3.1-8B; measured here it
                     # trained 98,304 and not 131,072 under 46 GiB (2026-12-06), so the ladder
                     # starts at 2x that: 196,608 (~4.5 min by its 98,304 step's 92 s), then 262,144
  step 580 unsloth-ladder-80 $PY "$HERE/train_step.py" --shapes llama-3-8b --seqs 196608,262144 \
    --systems unsloth --memory-cap-gib 79 --no-qlora-ckpt-off --long-steps 1 --warmup 0 --no-gpu-busy \
    --worker-timeout 570 --model-root /tmp/models --out "$OUT/unsloth-80" --deadline 575
  ;;
moe)  # Mixtral-8x7B under a 40 GB cap: its projections go in parts of output rows (no host read),
      # so the step is captured: graphed (qlora) and eager (qlora-eager)
  step 400 mixtral-8x7b-40gb $PY "$HERE/train_step.py" --shapes mixtral-8x7b --seqs 2048 \
    --systems qlora,qlora-eager --memory-cap-gib 37.25 --keep-attention 0 --no-qlora-ckpt-off \
    --steps 5 --warmup 2 --random-weights --no-gpu-busy --worker-timeout 195 --deadline 395 \
    --out "$OUT/mixtral"
  ;;
moe-graphs)
  step 150 gpu-check-moe $PY "$HERE/gpu_check.py" --checks moe --out "$OUT/gpu-check-moe.jsonl"
  step 300 qwen3-30b-a3b-24gb $PY "$HERE/train_step.py" --shapes qwen3-30b-a3b --seqs 2048 \
    --systems qlora,qlora-eager --memory-cap-gib 22.35 --keep-attention 0 --no-qlora-ckpt-off \
    --steps 8 --warmup 3 --random-weights --no-gpu-busy --worker-timeout 145 --deadline 295 \
    --out "$OUT/qwen3-moe-24gb"
  ;;
moe-peers)
  # from the environment: LIMIT (default 570; up to ~585 leaves the preamble and timeout's 5 s
  # grace inside a 600 s call), WORKER_TIMEOUT (400: one hung system leaves the others time),
  # STEPS/WARMUP (6/2), CAP (GiB, none by default: the seeds' stack keeps the experts in bf16),
  # CKPT_OFF=1 (qlora's systems also without checkpointing, what --auto_fit picks where it fits),
  # SHAPE (qwen3-30b-a3b; qwen3-30b-a3b-24-layers: its first 24 layers, which the seeds' stack fits
  # on an 80 GB card, 30 GB of checkpoint).
  # qlora,unsloth needs LIMIT >= 330: the checkpoint's writing took 71-85 s and Unsloth's load
  # 41-74 s (2026-12-07); at LIMIT=300 the 14:06 run cut Unsloth before its first step
  LIMIT=${LIMIT:-570}
  WORKER_TIMEOUT=${WORKER_TIMEOUT:-400}
  CKPT_FLAG=--no-qlora-ckpt-off
  [ "${CKPT_OFF:-0}" = 1 ] && CKPT_FLAG=--qlora-ckpt-off
  step "$LIMIT" qwen3-moe-peers $PY "$HERE/train_step.py" --shapes "${SHAPE:-qwen3-30b-a3b}" \
    --seqs 2048 \
    --systems "${3:-qlora,hf}" ${CAP:+--memory-cap-gib "$CAP"} --keep-attention 0 $CKPT_FLAG \
    --steps "${STEPS:-6}" --warmup "${WARMUP:-2}" --no-gpu-busy --model-root /dev/shm/models \
    --worker-timeout "$WORKER_TIMEOUT" --deadline $((LIMIT - 5)) --out "$OUT/qwen3-moe-peers"
  ;;
profile-2048)
  step 70 profile-llama-detail $PY "$HERE/profile_step.py" --shape llama-3-8b --seq 2048 --ours --graphs \
    --fused --fast --group --keep-attention --steps 2 --detail copy,elementwise,other --out /tmp/profile
  ;;
profile-phi4)  # Phi-4's graph step: 309 ms a step, 297 of kernels (2026-12-06 14:21); Llama's has no such gap
  step 200 profile-phi4-detail $PY "$HERE/profile_step.py" --shape phi-4 --seq 2048 --ours --graphs \
    --fused --fast --group --keep-attention --steps 3 --detail copy,elementwise,other --out /tmp/profile
  ;;
profile-moe)  # Qwen3-30B-A3B's eager step: 0.89 s a step at 0.05 MFU (2026-12-06 11:17); no graphs, nothing kept
  step 400 profile-qwen3-moe-detail $PY "$HERE/profile_step.py" --shape qwen3-30b-a3b --seq 2048 --ours \
    --fused --fast --group --steps 2 --detail copy,elementwise,other --out /tmp/profile
  ;;
triton-experts)
  step 110 grouped-gemm $PY "$HERE/grouped_gemm.py" --reps 10 --out "$OUT/grouped-gemm.jsonl"
  step 200 qwen3-moe-triton-experts $PY "$HERE/train_step.py" --shapes qwen3-30b-a3b --seqs 2048 \
    --systems qlora-triton-experts,qlora --memory-cap-gib 22.35 --keep-attention 0 \
    --no-qlora-ckpt-off --steps 4 --warmup 2 --random-weights --no-gpu-busy --worker-timeout 95 \
    --deadline 195 --out "$OUT/qwen3-moe-triton-experts"
  step 150 gpu_check-moe $PY "$HERE/gpu_check.py" --checks moe --out "$OUT/gpu-check-moe.jsonl"
  ;;
checks)
  step 420 gpu_check $PY "$HERE/gpu_check.py" --out "$OUT/gpu-check.jsonl"  # every check
  ;;
families)  # qlora first: a system the deadline cuts is the last one of its shape
  step 215 gemma2-9b-2048 $PY "$HERE/train_step.py" --shapes gemma-2-9b --seqs 2048 \
    --systems qlora,hf,qlora-nokeep,unsloth --no-qlora-ckpt-off --steps 8 --warmup 3 \
    --out "$OUT/gemma2" --deadline 210
  step 255 phi4-2048 $PY "$HERE/train_step.py" --shapes phi-4 --seqs 2048 \
    --systems qlora,hf,unsloth --no-qlora-ckpt-off --steps 8 --warmup 3 --out "$OUT/phi4" \
    --deadline 250
  # the generic path loads through transformers (~20 s for 1.6B) and runs eager: 60 s was too short
  step 120 generic-stablelm-2048 $PY "$HERE/train_step.py" --shapes stablelm-2-1.6b --seqs 2048 \
    --systems qlora,hf --no-qlora-ckpt-off --steps 10 --warmup 3 --out "$OUT/generic" --deadline 115
  ;;
phi4-keepacts)
  step 470 phi4-keepacts $PY "$HERE/train_step.py" --shapes phi-4 --seqs 2048 \
    --systems qlora,qlora-keepacts,unsloth,hf --keep-activations "${N:-26}" --no-qlora-ckpt-off \
    --steps 8 --warmup 3 --deadline 460 --out "$OUT/phi4-keepacts"
  ;;
families-gemma-unsloth)  # qlora first, Unsloth compiled last: the deadline cuts it before the fallback
  step 420 gemma2-9b-unsloth-2048 $PY "$HERE/train_step.py" --shapes gemma-2-9b --seqs 2048 \
    --systems qlora,unsloth-nocompile,unsloth --no-qlora-ckpt-off --steps 8 --warmup 3 \
    --out "$OUT/gemma2-unsloth" --deadline 410
  ;;
dpo)  # about 9 min in all: each part's --deadline skips (and records) what would not fit
  step 300 llama-dpo $PY "$HERE/preference_step.py" --shapes llama-3-8b --systems qlora,trl,unsloth \
    --steps 6 --warmup 2 --out "$OUT/llama-dpo" --deadline 290
  step 190 qwen-dpo $PY "$HERE/preference_step.py" --shapes qwen2.5-1.5b \
    --systems qlora,qlora-eager,trl,unsloth --steps 8 --warmup 2 --out "$OUT/qwen-dpo" \
    --model-root /tmp/dpo-models --deadline 180
  step 70 qwen-dpo-ragged $PY "$HERE/preference_step.py" --shapes qwen2.5-1.5b --ragged \
    --systems qlora,qlora-padded --steps 8 --warmup 2 --out "$OUT/qwen-dpo-ragged" \
    --model-root /tmp/dpo-models --deadline 65
  ;;
orpo)  # about 8 min in all: the DPO part's steps less its reference forward; loading dominates
  step 300 llama-orpo $PY "$HERE/preference_step.py" --method orpo --shapes llama-3-8b \
    --systems qlora,trl,unsloth --steps 6 --warmup 2 --out "$OUT/llama-orpo" --deadline 290
  step 190 qwen-orpo $PY "$HERE/preference_step.py" --method orpo --shapes qwen2.5-1.5b \
    --systems qlora,qlora-eager,trl,unsloth --steps 8 --warmup 2 --out "$OUT/qwen-orpo" \
    --deadline 180
  ;;
dpo-8b|orpo-8b)  # Llama-3-8B alone, the step with and without checkpointing beside both peers
  method=${PART%-8b}
  step 580 "llama-$method" $PY "$HERE/preference_step.py" --method "$method" --shapes llama-3-8b \
    --systems qlora,qlora-nockpt,unsloth,trl --steps 6 --warmup 2 --out "$OUT/llama-$method" \
    --deadline 570
  ;;
kto)  # at most 7.5 min: the graphed preference steps checked against eager (KTO among them) and
      # `qlora train --method dpo / kto` end to end (~2-4 min), then KTO timed graphed, eager and in
      # TRL's KTOTrainer (qlora first: a system the deadline cuts is the last one)
  step 240 gpu-check-preference $PY "$HERE/gpu_check.py" --checks preference --out "$OUT/gpu-check.jsonl"
  step 200 qwen-kto $PY "$HERE/preference_step.py" --method kto --shapes qwen2.5-1.5b \
    --systems qlora,qlora-eager,trl --steps 8 --warmup 2 --out "$OUT/qwen-kto" --deadline 190
  ;;
export-8b|export-8b-q8|export-8b-ours|export-8b-cpu|export-8b-cpu-q8)  # per file: the export (on the GPU) and the check (the 16-bit reference
                        # on the GPU, the file in llama.cpp on the CPU); --deadline skips a file
                        # that would not fit and records it
  # the other parts' random checkpoints (remade on demand) would hold 15-19 GB of the 64 GB disk
  # the 8B checkpoint and the GGUF need (the export writes no merged copy: one pass, MERGE_AND_EXPORT.md)
  rm -rf /tmp/models /tmp/pm
  df -h /tmp | tail -1
  if [ -f "$HERE/../.whl/llamacpp.tar.xz" ]; then
    mkdir -p /tmp/llamacpp && tar -C /tmp/llamacpp -xJf "$HERE/../.whl/llamacpp.tar.xz"
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/llamacpp  # last: the image's own packages first
  fi
  $PY -c 'import gguf, llama_cpp; print("gguf and llama-cpp-python", llama_cpp.__version__, "importable")' \
    || echo "=== gguf or llama_cpp not importable: the check will fail (its error is recorded; the export is still timed)"
  if [ "$PART" = export-8b ]; then
    step 565 export-check-8b $PY "$HERE/export_check.py" --shape llama-3-8b --types f16,q4_k_m,q8_0 \
      --peer-types q4_k_m --rms-layers 0,31 --delete-gguf --llama-python "$PY" --work /tmp/export-check \
      --deadline 545 --out "$OUT/export-check.json"
  elif [ "$PART" = export-8b-ours ]; then
    step 400 export-check-8b-ours $PY "$HERE/export_check.py" --shape llama-3-8b --types q4_k_m,q8_0 \
      --peer-quantizer none --delete-gguf --llama-python "$PY" --work /tmp/export-check \
      --deadline "${EXPORT_DEADLINE:-380}" --out "$OUT/export-check-ours.json"
  elif [ "$PART" = export-8b-cpu-q8 ]; then
    step 580 export-check-8b-cpu-q8 $PY "$HERE/export_check.py" --shape llama-3-8b --types q8_0 \
      --device cpu --peer-quantizer none --delete-gguf --llama-python "$PY" --work /tmp/export-check \
      --deadline 560 --out "$OUT/export-check-cpu-q8.json"
  elif [ "$PART" = export-8b-cpu ]; then
    step 565 export-check-8b-cpu $PY "$HERE/export_check.py" --shape llama-3-8b --types q4_k_m,q8_0 \
      --device cpu --peer-quantizer none --delete-gguf --llama-python "$PY" --work /tmp/export-check \
      --deadline 545 --out "$OUT/export-check-cpu.json"
  else
    step 560 export-check-8b-q8 $PY "$HERE/export_check.py" --shape llama-3-8b --types q8_0 \
      --peer-quantizer none --delete-gguf --llama-python "$PY" --work /tmp/export-check \
      --deadline 530 --out "$OUT/export-check-q8.json"
  fi
  ;;
*)
  echo "$USAGE" >&2
  exit 2
  ;;
esac
