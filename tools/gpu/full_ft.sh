#!/usr/bin/env bash
# The reference's full fine-tuning (--use_lora False) of DeepSeekMoE-16B on one H200: a random
# full-size checkpoint, bf16 weights updated by 8-bit AdamW with stochastic rounding, bf16
# gradients, micro-batch 16 x 1024 tokens, no accumulation, 20 steps. The final model (bf16
# shards, 33 GB) goes to local disk; no intermediate checkpoint is written in this call (weights
# and 8-bit moments are 66 GB, more than the disk holds beside the final model). Binaries in
# $B, results under $OUT.
set -u
. tools/gpu/common.sh
FULL=(--data_path "$DATA" --num_train_epochs 3 "${SHAPE[@]}" --gradient_accumulation_steps 1
  --learning_rate 2e-5 --warmup_steps 10 --logging_steps 1 --lr_scheduler_type cosine
  --gradient_checkpointing True --report_to none --bf16 True --use_lora False --bits 16
  --max_grad_norm 1.0 --optim adamw_8bit --adapter_dtype bfloat16 --grads_dtype bfloat16)
# The step alone first (random weights built on the device, no checkpoint on disk).
bench_run full_16x1024 16 1024 --full --bits 16 --bf16_adapters --optim adamw_8bit --bf16_grads
bench_summary tokens_per_s peak_mib median_step_s mfu matmul_probe_tflops
rm -rf "$WORK/full"
stage full_ft 580 "$B/qlora-train" --model_name_or_path "$CK" --output_dir "$WORK/full" \
  "${FULL[@]}" --max_steps 20 --save_strategy no --summary_json "$O/full.json"
du -sh "$WORK/full" 2>/dev/null
rm -rf "$WORK/full"
[ -e "$O/full.json" ] && python3 - "$O/full.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
keep = ["load_s", "first_step_s", "steady_tokens_per_s", "peak_gpu_mib", "peak_host_rss_bytes", "final_save"]
print({k: d.get(k) for k in keep})
print("steps", [(s["step"], round(s["seconds"], 2), s["tokens"], round(s["loss"], 4)) for s in d.get("steps", [])])
PY
