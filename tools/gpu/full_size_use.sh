#!/usr/bin/env bash
# The README walkthrough at full size, part 2 (GPU machine, repository root): an adapter from
# one step of the fast configuration, merge-adapter at 16B (time, peak host RSS), evaluate and
# generate with and without the adapter (tokens/s, GPU memory with and without a recorded
# graph), then the GPU test binaries in $B/tests (bf16 training agreement, CUDA parity).
set -u
. tools/gpu/common.sh
stage adapter 300 "$B/qlora-train" --model_name_or_path "$CK" --output_dir "$WORK/ad" "${WALK[@]}" \
  "${FAST[@]}" --max_steps 1 --warmup_steps 0 --learning_rate 1e-4 --save_strategy no \
  --summary_json "$O/ad.json"
stage merge 420 "$B/merge-adapter" --model_name_or_path "$CK" --adapter "$WORK/ad" \
  --output_dir "$WORK/merged" --bits 4 --dtype bf16
du -sh "$WORK/merged"; ls "$WORK/merged" | head; rm -rf "$WORK/merged"
EV=(--model_name_or_path "$CK" --data_path "$DATA" "${EVAL[@]}" --bits 4 --bf16 True)
stage eval_base 300 "$B/evaluate" "${EV[@]}"
stage eval_adapter 300 "$B/evaluate" "${EV[@]}" --adapter "$WORK/ad"
stage eval_adapter_graph 300 "$B/evaluate" "${EV[@]}" --adapter "$WORK/ad" --no_grad false
GEN=(--model_name_or_path "$CK" --bits 4 --bf16 True --template reference --max_new_tokens 64
  --prompt "Explain the Pythagorean theorem.")
stage gen_base 240 "$B/generate" "${GEN[@]}"
stage gen_adapter 240 "$B/generate" "${GEN[@]}" --adapter "$WORK/ad"
for tb in "$B"/tests/*; do
  [ -x "$tb" ] || continue
  MOE_PEFT_REQUIRE_CUDA=1 stage "test_$(basename "$tb")" 300 "$tb" --nocapture --test-threads 1
done
for f in ad; do
  [ -e "$O/$f.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('$f', {k: d.get(k) for k in ['load_s','first_step_done_s','steady_tokens_per_s','padding_fraction','peak_gpu_mib','peak_host_rss_bytes','final_save']})" "$O/$f.json"
done
grep -h "^merged\|evaluated\|prefill\|\"loss\"" "$O"/merge.log "$O"/eval_*.log "$O"/gen_*.log 2>/dev/null | cut -c1-400
