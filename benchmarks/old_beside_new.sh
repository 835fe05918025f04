#!/usr/bin/env bash
# One commit beside another on the GPU: the qlora step of train_step.py at Llama-3-8B and
# Qwen2.5-1.5B, seq 2048, old and new alternating twice, same checkpoints; with `moe`, Qwen3-30B-A3B
# at seq 2048 under the 24 GB cap (22.35 GiB), random weights drawn on the GPU, instead. The old
# tree is unpacked beside this one first:
#   git archive COMMIT src benchmarks | tar -x -C .old --exclude=benchmarks/results
# then, on the device (.old is carried as an untracked folder):  bash benchmarks/old_beside_new.sh [moe]
case "${1:-}" in -h|--help) sed -n 2,7p "$0"; exit 0;; esac
: "${OUT:?set OUT to the results folder}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/site && tar -C /tmp/site -xJf .site/site.tar.xz && export PYTHONPATH=/tmp/site:$PYTHONPATH
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c 'import torch,triton,bitsandbytes;print(torch.__version__,triton.__version__,bitsandbytes.__version__)'
show() {  # the figures of one run's results
  grep -h '"tokens_per_s"\|"error"' "$1"/results.jsonl 2>/dev/null | python -c 'import sys,json;[print({k:v for k,v in json.loads(l).items() if k in ("system","tokens_per_s","step_s_median","peak_alloc_gib","peak_reserved_gib","loss_first","loss_last","gpu_busy_ms","error")}) for l in sys.stdin]'
}
if [ "${1:-}" = moe ]; then  # each run ~40 s: the random weights ~20 s, the capture ~7 s
  for i in 1 2; do for t in old new; do
    d=.; [ $t = old ] && d=.old
    timeout 85 python $d/benchmarks/train_step.py --shapes qwen3-30b-a3b --seqs 2048 --systems qlora --memory-cap-gib 22.35 --keep-attention 0 --no-qlora-ckpt-off --steps 6 --warmup 2 --random-weights --no-gpu-busy --worker-timeout 80 --deadline 82 --out $OUT/r/moe-$t$i > $OUT/r/moe-$t$i.log 2>&1; echo "moe $t$i rc=$?"
    show $OUT/r/moe-$t$i
  done; done
  cd $OUT && tar czf oldnew.tar.gz r && rm -rf r
  exit 0
fi
for i in 1 2; do for t in old new; do
  d=.; [ $t = old ] && d=.old
  timeout 150 python $d/benchmarks/train_step.py --shapes llama-3-8b --seqs 2048 --systems qlora --no-qlora-ckpt-off --steps 10 --warmup 3 --model-root /tmp/models --out $OUT/r/llama-$t$i > $OUT/r/llama-$t$i.log 2>&1; echo "llama $t$i rc=$?"
  show $OUT/r/llama-$t$i
done; done
for i in 1 2; do for t in old new; do
  d=.; [ $t = old ] && d=.old
  timeout 100 python $d/benchmarks/train_step.py --shapes qwen2.5-1.5b --seqs 2048 --systems qlora --no-qlora-ckpt-off --steps 12 --warmup 4 --model-root /tmp/models --out $OUT/r/qwen-$t$i > $OUT/r/qwen-$t$i.log 2>&1; echo "qwen $t$i rc=$?"
  show $OUT/r/qwen-$t$i
done; done
cd $OUT && tar czf oldnew.tar.gz r && rm -rf r
