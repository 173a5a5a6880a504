#!/usr/bin/env bash
# The other families' presets on the H200: Qwen1.5-MoE-A2.7B, OLMoE-1B-7B, Qwen3-30B-A3B and
# Mixtral-8x7B shapes (random weights, NF4 + double quant, LoRA r=64 on every projection of
# every expert, gradient checkpointing), 16x1024 and 1x1024, with the lean settings
# (adamw_8bit, bf16 adapters and gradients). Run from the repository root on the GPU machine;
# binaries in $B, results under $OUT.
set -u
. tools/gpu/common.sh
lean="--bf16_grads --bf16_adapters --optim adamw_8bit"
BENCH_TIMEOUT=280
for p in qwen1.5-moe-a2.7b olmoe-1b-7b qwen3-30b-a3b mixtral-8x7b; do
  BENCH_PRESET=$p bench_run "${p}_16x1024" 16 1024 $lean
  BENCH_PRESET=$p bench_run "${p}_1x1024" 1 1024 $lean
done
bench_summary tokens_per_s peak_mib median_step_s mfu matmul_probe_tflops
