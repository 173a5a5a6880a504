#!/usr/bin/env bash
# Selective recomputation on the H200: qlora-bench (DeepSeekMoE-16B shapes, NF4 + DQ, r=64 on
# every projection, bf16 moments and gradients) with the last K decoder layers keeping their
# activations instead of being recomputed (K=0: every layer recomputed, the default). The first
# run of the call also measures the matmul probe. Run from the repository root on the GPU
# machine; binaries in $B (default .gpu/bin), results under $OUT.
#   KS="0 4 8 14 20 28" BATCH=16 bash tools/gpu/recompute_curve.sh
set -u
. tools/gpu/common.sh nocheckpoint
BATCH=${BATCH:-16}
probe="--matmul_probe 8192"
for K in ${KS:-0 4 8 14 20 28}; do
  stage "bench${BATCH}_k$K" 240 "$B/qlora-bench" --preset 16b --batch_size "$BATCH" --seq_len 1024 \
    --steps 3 --warmup 1 --bf16_moments --bf16_grads --keep_activations_layers "$K" $probe \
    --json "$O/bench${BATCH}_k$K.json"
  probe=""
done
for f in "$O"/bench"${BATCH}"_k*.json; do
  python3 - "$f" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(sys.argv[1].split("/")[-1], {k: d.get(k) for k in ["keep_activations_layers", "tokens_per_s", "peak_mib", "mfu", "median_step_s", "matmul_probe_tflops"]})
PY
done
