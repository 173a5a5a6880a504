#!/usr/bin/env bash
# One GPU call after host-side changes: every CUDA test binary (MOE_PEFT_REQUIRE_CUDA=1), the
# 1x1024 bench with and without recomputation, the bench at 4096 tokens, and the full-size
# walkthrough (random DeepSeekMoE-16B checkpoint, qlora-train with the fastest flags for 3 steps).
# Run from the repository root on the GPU machine; binaries in $B, results under $OUT.
set -u
B=${B:-.gpu/bin} bash tools/gpu/gpu_tests.sh
. tools/gpu/common.sh nocheckpoint
for spec in "1 1024 0 --matmul_probe 8192" "1 1024 28" "1 4096 0" "4 4096 0"; do
  set -- $spec
  stage "bench_b$1_s$2_k$3" 240 "$B/qlora-bench" --preset 16b --batch_size "$1" --seq_len "$2" \
    --steps 3 --warmup 1 --bf16_moments --bf16_grads --keep_activations_layers "$3" "${@:4}" \
    --json "$O/bench_b$1_s$2_k$3.json"
done
stage checkpoint 300 "$B/random-checkpoint" --preset deepseek-moe-16b --output_dir "$CK"
stage train_b 300 "$B/qlora-train" --model_name_or_path "$CK" --output_dir "$WORK/b" "${WALK[@]}" \
  "${FAST[@]}" --max_steps 3 --save_strategy no --summary_json "$O/b.json"
rm -rf "$WORK/b" "$CK"
for f in "$O"/bench_*.json "$O"/b.json; do
  [ -e "$f" ] && python3 - "$f" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); n = sys.argv[1].split("/")[-1]
keys = ["batch_size", "seq_len", "keep_activations_layers", "tokens_per_s", "peak_mib", "mfu", "median_step_s", "matmul_probe_tflops",
        "load_s", "first_step_done_s", "steady_tokens_per_s", "padding_fraction", "peak_gpu_mib", "peak_host_rss_bytes"]
print(n, {k: d[k] for k in keys if k in d})
PY
done
