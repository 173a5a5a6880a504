#!/usr/bin/env bash
# One dequantization launch per projection type of the routed experts, with and without
# (`--batched_dequant false`: one launch per expert), at 16x1024 and 1x1024, with the
# memory-lean settings (adamw_8bit or paged_adamw_8bit, bf16 adapters, bf16 gradients).
# Run from the repository root on the GPU machine; binaries in $B, results under $OUT.
set -u
. tools/gpu/common.sh nocheckpoint
probe="--matmul_probe 8192"
run() { # name batch seq flags...
  local name=$1 b=$2 s=$3; shift 3
  stage "$name" 150 "$B/qlora-bench" --preset 16b --batch_size "$b" --seq_len "$s" --steps 3 \
    --warmup 1 --bf16_grads --bf16_adapters "$@" $probe --json "$O/$name.json"
  probe=""
}
for case in ${CASES:-16x1024 1x1024}; do
  b=${case%x*}; s=${case#*x}
  run "${case}_8bit_batched" "$b" "$s" --optim adamw_8bit
  run "${case}_8bit_single" "$b" "$s" --optim adamw_8bit --batched_dequant false
  run "${case}_paged_batched" "$b" "$s" --optim paged_adamw_8bit
done
for f in "$O"/*x*_*.json; do
  python3 - "$f" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(sys.argv[1].split("/")[-1], {k: d.get(k) for k in ["optim", "batched_dequant", "tokens_per_s", "peak_mib", "median_step_s", "mfu", "matmul_probe_tflops"]})
PY
done
