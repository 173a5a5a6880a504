#!/usr/bin/env bash
# The README walkthrough at full size, part 1 (run on the GPU machine from the repository root):
# a random DeepSeekMoE-16B checkpoint, qlora-bench, the fastest qlora-train configuration (b)
# with checkpoints, a resume from the last one and a start from the saved quantized base, then
# the reference recipe's exact flags (a). Binaries in $B (default .gpu/bin), results under $OUT.
# TINY=1 runs the same stages on the tiny preset (a CPU smoke test of the flags).
set -u
. tools/gpu/common.sh
stage bench 240 "$B/qlora-bench" $BENCH --bf16_moments --bf16_grads --json "$O/bench.json"
# (b) the fastest flags, a checkpoint at step 2 and 4, the quantized base written on the way.
stage train_b 420 "$B/qlora-train" --model_name_or_path "$CK" --output_dir "$WORK/b" "${WALK[@]}" \
  "${FAST[@]}" --max_steps 4 --save_steps 2 --save_quantized "$WORK/q" --summary_json "$O/b.json"
ls -la "$WORK/b" "$WORK/b/checkpoint-4" 2>/dev/null | head -30
# Resume (b) from its last checkpoint for one more step.
stage resume_b 300 "$B/qlora-train" --model_name_or_path "$CK" --output_dir "$WORK/b" "${WALK[@]}" \
  "${FAST[@]}" --max_steps 5 --save_steps 100 --save_strategy no --resume_from_checkpoint True \
  --summary_json "$O/b_resume.json"
rm -rf "$WORK/b"
# Start from the saved quantized base (no quantization at load).
stage from_quantized 300 "$B/qlora-train" --model_name_or_path "$WORK/q" --output_dir "$WORK/bq" \
  "${WALK[@]}" "${FAST[@]}" --max_steps 2 --save_strategy no --summary_json "$O/bq.json"
du -sh "$WORK/q"
rm -rf "$WORK/bq" "$WORK/q"
# (a) the reference recipe's exact flags (f32 moments and gradients, embed_tokens and lm_head
# trained in full, no packing), a checkpoint at step 2.
stage train_a 480 "$B/qlora-train" --model_name_or_path "$CK" --output_dir "$WORK/a" "${WALK[@]}" \
  --max_steps 3 --save_steps 2 --summary_json "$O/a.json"
ls -la "$WORK/a" "$WORK/a/checkpoint-2" 2>/dev/null | head -30
rm -rf "$WORK/a"
for f in bench b b_resume bq a; do
  [ -e "$O/$f.json" ] && python3 - "$O/$f.json" "$f" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); n = sys.argv[2]
if n == "bench":
    print(n, {k: d.get(k) for k in ["tokens_per_s", "peak_mib", "mfu", "matmul_probe_tflops", "median_step_s"]})
else:
    keep = ["load_s", "first_step_done_s", "first_step_s", "steady_tokens_per_s", "padding_fraction",
            "peak_gpu_mib", "peak_host_rss_bytes", "saves", "final_save", "save_quantized", "resumed_from"]
    print(n, {k: d.get(k) for k in keep})
    print(n, "steps", [(s["step"], round(s["seconds"], 2), s["tokens"], s["padded_tokens"], round(s["loss"], 4)) for s in d.get("steps", [])])
PY
done
