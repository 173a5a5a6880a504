#!/usr/bin/env bash
# One dequantization launch per projection type of the routed experts, with and without
# (`--batched_dequant false`: one launch per expert), at 16x1024 and 1x1024, with the
# memory-lean settings (adamw_8bit or paged_adamw_8bit, bf16 adapters, bf16 gradients).
# Run from the repository root on the GPU machine; binaries in $B, results under $OUT.
set -u
. tools/gpu/common.sh nocheckpoint
lean="--bf16_grads --bf16_adapters"
for case in ${CASES:-16x1024 1x1024}; do
  b=${case%x*}; s=${case#*x}
  bench_run "${case}_8bit_batched" "$b" "$s" $lean --optim adamw_8bit
  bench_run "${case}_8bit_single" "$b" "$s" $lean --optim adamw_8bit --batched_dequant false
  bench_run "${case}_paged_batched" "$b" "$s" $lean --optim paged_adamw_8bit
done
bench_summary optim batched_dequant tokens_per_s peak_mib median_step_s mfu matmul_probe_tflops
