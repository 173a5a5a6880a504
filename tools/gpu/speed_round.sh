#!/usr/bin/env bash
# The speed levers of the MoE layer on the H200: qlora-bench at DeepSeekMoE-16B shapes (NF4 +
# DQ, r=64 on every projection, 8-bit AdamW, bf16 adapters and gradients) with each lever on
# (the default) and off: --routed_node (dispatch, experts and combine as one graph node) and
# --tn_kernel (the experts' weight gradients in one segmented launch where the experts average
# few rows: at 1x1024; at 16x1024 both take cuBLAS). Also the paged 8-bit
# state (the memory targets). The first run measures the matmul probe.
set -u
. tools/gpu/common.sh nocheckpoint
F="--bf16_grads --bf16_adapters --optim adamw_8bit"
P="--bf16_grads --bf16_adapters --optim paged_adamw_8bit"
bench_run 16x1024_default 16 1024 $F
bench_run 16x1024_no_routed_node 16 1024 $F --routed_node false
bench_run 16x1024_paged 16 1024 $P
bench_run 1x1024_default 1 1024 $F
bench_run 1x1024_no_tn_kernel 1 1024 $F --tn_kernel false
bench_run 1x1024_no_routed_node 1 1024 $F --routed_node false
bench_run 1x1024_paged 1 1024 $P
bench_run 4x4096_default 4 4096 $F
bench_summary tokens_per_s median_step_s peak_mib mfu routed_node tn_kernel optim matmul_probe_tflops
