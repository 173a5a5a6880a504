#!/usr/bin/env bash
# The memory levers on the H200: qlora-bench (DeepSeekMoE-16B shapes, NF4 + DQ, r=64 on every
# projection, bf16 gradient buffer) with the optimizer state and adapter dtype varied:
#   torch: adamw_torch, bf16 moments (the previous best)     8bit: adamw_8bit
#   paged: paged_adamw_8bit (state in host memory)           +bf16: bf16 adapter weights
# at 16x1024, 1x1024 and 1x4096 (and 4x4096). The first run also measures the matmul probe.
# Run from the repository root on the GPU machine; binaries in $B, results under $OUT.
set -u
. tools/gpu/common.sh nocheckpoint
probe="--matmul_probe 8192"
run() { # name batch seq flags...
  local name=$1 b=$2 s=$3; shift 3
  stage "$name" 200 "$B/qlora-bench" --preset 16b --batch_size "$b" --seq_len "$s" --steps 3 \
    --warmup 1 --bf16_grads "$@" $probe --json "$O/$name.json"
  probe=""
}
for case in ${CASES:-16x1024 1x1024 1x4096}; do
  b=${case%x*}; s=${case#*x}
  run "${case}_torch" "$b" "$s" --bf16_moments
  run "${case}_8bit" "$b" "$s" --optim adamw_8bit
  run "${case}_8bit_bf16" "$b" "$s" --optim adamw_8bit --bf16_adapters
  run "${case}_paged_bf16" "$b" "$s" --optim paged_adamw_8bit --bf16_adapters
done
for f in "$O"/*x*_*.json; do
  python3 - "$f" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(sys.argv[1].split("/")[-1], {k: d.get(k) for k in ["optim", "bf16_adapters", "tokens_per_s", "peak_mib", "median_step_s", "mfu", "matmul_probe_tflops"]})
PY
done
