#!/usr/bin/env bash
# The memory levers on the H200: qlora-bench (DeepSeekMoE-16B shapes, NF4 + DQ, r=64 on every
# projection, bf16 gradient buffer) with the optimizer state and adapter dtype varied:
#   torch: adamw_torch, bf16 moments (the previous best)     8bit: adamw_8bit
#   paged: paged_adamw_8bit (state in host memory)           +bf16: bf16 adapter weights
# at 16x1024, 1x1024 and 1x4096 (and 4x4096). The first run also measures the matmul probe.
# Run from the repository root on the GPU machine; binaries in $B, results under $OUT.
set -u
. tools/gpu/common.sh nocheckpoint
for case in ${CASES:-16x1024 1x1024 1x4096}; do
  b=${case%x*}; s=${case#*x}
  bench_run "${case}_torch" "$b" "$s" --bf16_grads --bf16_moments
  bench_run "${case}_8bit" "$b" "$s" --bf16_grads --optim adamw_8bit
  bench_run "${case}_8bit_bf16" "$b" "$s" --bf16_grads --optim adamw_8bit --bf16_adapters
  bench_run "${case}_paged_bf16" "$b" "$s" --bf16_grads --optim paged_adamw_8bit --bf16_adapters
done
bench_summary optim bf16_adapters tokens_per_s peak_mib median_step_s mfu matmul_probe_tflops
