#!/usr/bin/env bash
# The reference's full fine-tuning (--use_lora False) of DeepSeekMoE-16B on one H200: a random
# full-size checkpoint, bf16 weights updated by 8-bit AdamW with stochastic rounding, bf16
# gradients, micro-batch 16 x 1024 tokens (packed), accumulation 1, 20 steps. The checkpoint of
# step 20 (bf16 weights + 8-bit moments + schedule, 66 GB) and the final model (its weights,
# hard-linked) go to $FT_OUT (/dev/shm: the 64 GiB disk cannot hold the checkpoint beside
# the system). Binaries in $B, results under $OUT.
set -u
. tools/gpu/common.sh
FT_OUT=${FT_OUT:-/dev/shm/full}
FULL=(--data_path "$DATA" --num_train_epochs 3 "${SHAPE[@]}" --gradient_accumulation_steps 1
  --learning_rate 2e-5 --warmup_steps 10 --logging_steps 1 --lr_scheduler_type cosine
  --gradient_checkpointing True --report_to none --bf16 True --use_lora False --bits 16
  --max_grad_norm 1.0 --optim adamw_8bit --adapter_dtype bfloat16 --grads_dtype bfloat16
  --packing True)
# The step alone first (random weights built on the device, no checkpoint on disk), unless
# SKIP_BENCH=1.
[ "${SKIP_BENCH:-0}" = 1 ] ||
  bench_run full_16x1024 16 1024 --full --bits 16 --bf16_adapters --optim adamw_8bit --bf16_grads
rm -rf "$FT_OUT"
stage full_ft "${FT_TIMEOUT:-420}" "$B/qlora-train" --model_name_or_path "$CK" --output_dir "$FT_OUT" \
  "${FULL[@]}" --max_steps 20 --save_strategy steps --save_steps 20 --save_total_limit 1 \
  --summary_json "$O/full.json"
grep -h "^step \|saved\|wrote the final\|^run:" "$O/full_ft.log" | cut -c1-200
du -sh "$FT_OUT" "$FT_OUT"/checkpoint-* 2>/dev/null
ls -la "$FT_OUT" "$FT_OUT"/checkpoint-* 2>/dev/null | head -40
rm -rf "$FT_OUT"
[ -e "$O/full.json" ] && python3 - "$O/full.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
keep = ["load_s", "first_step_s", "steady_tokens_per_s", "peak_gpu_mib", "peak_host_rss_bytes", "saves", "final_save"]
print({k: d.get(k) for k in keep})
print("steps", [(s["step"], round(s["seconds"], 2), s["tokens"], round(s["loss"], 4)) for s in d.get("steps", [])])
PY
