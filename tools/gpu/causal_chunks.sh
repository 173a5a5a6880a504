#!/usr/bin/env bash
# Causal query chunks in attention (the keys a chunk of queries cannot see are skipped), with
# and without (`--causal_chunks false`: the full square), at 16x1024, 4x4096 and 1x4096, with
# adamw_8bit, bf16 adapters and bf16 gradients. Run from the repository root on the GPU
# machine; binaries in $B, results under $OUT.
set -u
. tools/gpu/common.sh nocheckpoint
probe="--matmul_probe 8192"
run() { # name batch seq flags...
  local name=$1 b=$2 s=$3; shift 3
  stage "$name" 150 "$B/qlora-bench" --preset 16b --batch_size "$b" --seq_len "$s" --steps 3 \
    --warmup 1 --bf16_grads --bf16_adapters --optim adamw_8bit "$@" $probe --json "$O/$name.json"
  probe=""
}
run 16x1024_chunks 16 1024
run 16x1024_square 16 1024 --causal_chunks false
run 4x4096_chunks 4 4096
run 4x4096_square 4 4096 --causal_chunks false
run 1x4096_chunks 1 4096
for f in "$O"/*x*_*.json; do
  python3 - "$f" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(sys.argv[1].split("/")[-1], {k: d.get(k) for k in ["causal_chunks", "tokens_per_s", "peak_mib", "median_step_s", "mfu", "matmul_probe_tflops"]})
PY
done
