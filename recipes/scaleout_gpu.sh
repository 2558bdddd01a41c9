#!/bin/bash
# The GPU figures of docs/results/scaleout.json, on 2 GPUs (nvidia-h200-x2), from the repository root:
#   bash recipes/scaleout_gpu.sh OUTDIR
# 1) a model with Qwen3-0.6B's shapes (random weights), 2) one-GPU step time DMS vs plain distillation
# (GPU 1) while ZeRO-3 runs on 1 GPU (GPU 0), 3) ZeRO-3 on 2 GPUs: uninterrupted, then killed (kill -9 in
# step 7, mid-accumulation) and resumed with --resume auto.
set -u
OUT=${1:-runs/bench/out}
mkdir -p "$OUT"
B=runs/bench/qwen3-0.6b-shapes
R=recipes/qwen3_0p6b_shapes_bench.yaml
L="accelerate launch --config_file recipes/accelerate/zero3.yaml"
S="--steps 10 --save-every 4 --no-progress"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
t0=$(date +%s)
python3 -m dms.training.bench make-base $B > "$OUT/make_base.log" 2>&1 || { tail -20 "$OUT/make_base.log"; exit 1; }
echo "base built $(( $(date +%s) - t0 ))s"
CUDA_VISIBLE_DEVICES=1 python3 -m dms.training.bench step-time $B --seq-len 2048 --batch 2 --steps 5 \
  --impls auto --modes distill,dms,distill_kernel,dms_noterm --out "$OUT/step_time.json" > "$OUT/step_time.log" 2>&1 &
ST=$!
CUDA_VISIBLE_DEVICES=0 $L --num_processes 1 --main_process_port 29501 train/retrofit.py --recipe $R $S \
  --output runs/bench/z3_1gpu > "$OUT/z3_1gpu.log" 2>&1
echo "z3 1gpu rc=$? $(( $(date +%s) - t0 ))s"
python3 -m dms.training.bench throughput runs/bench/z3_1gpu > "$OUT/z3_1gpu.json"; cat "$OUT/z3_1gpu.json"
wait $ST; echo "step-time rc=$? $(( $(date +%s) - t0 ))s"; grep -h '^{' "$OUT/step_time.log" | tail -2
$L --num_processes 2 --main_process_port 29502 train/retrofit.py --recipe $R $S --output runs/bench/z3_2gpu \
  > "$OUT/z3_2gpu.log" 2>&1
echo "z3 2gpu rc=$? $(( $(date +%s) - t0 ))s"
python3 -m dms.training.bench throughput runs/bench/z3_2gpu > "$OUT/z3_2gpu.json"; cat "$OUT/z3_2gpu.json"
cp runs/bench/z3_2gpu/losses.jsonl "$OUT/z3_2gpu_losses.jsonl"
DMS_TEST_FAULT=kill:6:1:0 $L --num_processes 2 --main_process_port 29503 train/retrofit.py --recipe $R $S \
  --output runs/bench/z3_resume > "$OUT/z3_killed.log" 2>&1
echo "z3 killed rc=$? latest=$(cat runs/bench/z3_resume/checkpoints/latest) $(( $(date +%s) - t0 ))s"
$L --num_processes 2 --main_process_port 29504 train/retrofit.py --recipe $R $S --output runs/bench/z3_resume \
  --resume auto > "$OUT/z3_resumed.log" 2>&1
echo "z3 resumed rc=$? $(( $(date +%s) - t0 ))s"
python3 -m dms.training.bench curve-diff runs/bench/z3_2gpu runs/bench/z3_resume > "$OUT/resume.json"
cp runs/bench/z3_resume/losses.jsonl "$OUT/z3_resume_losses.jsonl"
cp runs/bench/z3_1gpu/losses.jsonl "$OUT/z3_1gpu_losses.jsonl"
for f in "$OUT"/*.json; do echo "== $f"; head -c 1500 "$f"; echo; done
grep -h '^{' "$OUT/step_time.log" | tail -3
for f in "$OUT"/*.log; do if grep -q "Error" "$f"; then echo "== $f"; grep -B2 -A3 "Error" "$f" | tail -30; fi; done
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, transformers, deepspeed, accelerate; print(torch.__version__, transformers.__version__, deepspeed.__version__, accelerate.__version__)"
