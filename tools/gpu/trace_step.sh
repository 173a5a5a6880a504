#!/usr/bin/env bash
# Kernel time of one qlora-bench step on the GPU (tools/ktrace: CUPTI activity totals by
# kernel name between cuProfilerStart and cuProfilerStop), at DeepSeekMoE-16B shapes with the
# fastest flags, for each of $CASES (BxS). KT = the folder with libktrace.so (and the CUPTI
# library beside it). Prints the window (GPU time in kernels against first start to last
# end) and the largest kernels; the whole table is in $OUT/trace_<case>.txt.
set -u
. tools/gpu/common.sh nocheckpoint
KT=${KT:-.gpu/kt}
for case in ${CASES:-16x1024 1x1024}; do
  b=${case%x*}; s=${case#*x}
  CUDA_INJECTION64_PATH=$PWD/$KT/libktrace.so KTRACE_OUT=$O/trace_$case.txt \
    stage "trace_$case" 300 "$B/qlora-bench" --preset 16b --batch_size "$b" --seq_len "$s" \
    --steps 2 --warmup 1 --bf16_grads --bf16_adapters --optim adamw_8bit \
    --cuda_profiler_step 3 ${TRACE_FLAGS:-}
  head -n "${TOP:-45}" "$O/trace_$case.txt" | cut -c1-220
done
