#!/usr/bin/env bash
# qlora-bench at 16x1024 on realistic inputs: uniform random ids (the usual figure), Zipf-
# distributed ids (hot tokens route to hot experts), Open-Platypus-shaped rows packed into full
# rows, and the same rows as padded batches of real lengths (tokens/s counts real tokens).
# Run from the repository root on the GPU machine; binaries in $B, results under $OUT.
set -u
. tools/gpu/common.sh nocheckpoint
common=(--preset 16b --batch_size 16 --seq_len 1024 --steps 3 --warmup 1 --bf16_moments --bf16_grads)
stage uniform 240 "$B/qlora-bench" "${common[@]}" --matmul_probe 8192 --json "$O/uniform.json"
stage zipf10 240 "$B/qlora-bench" "${common[@]}" --zipf 1.0 --json "$O/zipf10.json"
stage zipf12 240 "$B/qlora-bench" "${common[@]}" --zipf 1.2 --json "$O/zipf12.json"
stage packed 240 "$B/qlora-bench" "${common[@]}" --data "$DATA" --json "$O/packed.json"
stage padded 240 "$B/qlora-bench" "${common[@]}" --data "$DATA" --packing false --json "$O/padded.json"
for f in uniform zipf10 zipf12 packed padded; do
  python3 - "$O/$f.json" "$f" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
st = d.get("steps", [])
pad = [round(1 - s["tokens"] / s["padded_tokens"], 3) for s in st if s.get("padded_tokens")]
print(sys.argv[2], {k: d.get(k) for k in ["tokens_per_s", "median_step_s", "peak_mib", "mfu", "matmul_probe_tflops"]}, "padding", pad)
PY
done
