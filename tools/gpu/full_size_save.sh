#!/usr/bin/env bash
# The walkthrough at full size, part 3 (GPU machine, repository root): the disk's own speed
# (dd, with and without fdatasync), qlora-bench and the fast configuration (b) in one call,
# checkpoint and adapter saves of (b) and of the reference flags (a), a resume of (b), and
# merge-adapter at 16B, then the GPU test binaries in $B/tests.
set -u
. tools/gpu/common.sh
t "disk: dd 8 GiB, page cache only, then with fdatasync"
dd if=/dev/zero of="$WORK/dd" bs=64M count=128 2>&1 | tail -1
rm -f "$WORK/dd"; sync
dd if=/dev/zero of="$WORK/dd" bs=64M count=128 conv=fdatasync 2>&1 | tail -1
rm -f "$WORK/dd"
stage bench 240 "$B/qlora-bench" $BENCH --bf16_moments --bf16_grads --json "$O/bench.json"
stage train_b 420 "$B/qlora-train" --model_name_or_path "$CK" --output_dir "$WORK/b" "${WALK[@]}" \
  "${FAST[@]}" --max_steps 3 --save_steps 2 --summary_json "$O/b.json"
stage resume_b 300 "$B/qlora-train" --model_name_or_path "$CK" --output_dir "$WORK/b" "${WALK[@]}" \
  "${FAST[@]}" --max_steps 4 --save_strategy no --resume_from_checkpoint "$WORK/b/checkpoint-2" \
  --summary_json "$O/b_resume.json"
stage merge 420 "$B/merge-adapter" --model_name_or_path "$CK" --adapter "$WORK/b" \
  --output_dir "$WORK/merged" --bits 4 --dtype bf16
rm -rf "$WORK/merged" "$WORK/b"
stage train_a 420 "$B/qlora-train" --model_name_or_path "$CK" --output_dir "$WORK/a" "${WALK[@]}" \
  --max_steps 1 --save_steps 1 --summary_json "$O/a.json"
rm -rf "$WORK/a"
for tb in "$B"/tests/*; do
  [ -x "$tb" ] || continue
  MOE_PEFT_REQUIRE_CUDA=1 stage "test_$(basename "$tb")" 300 "$tb" --nocapture --test-threads 1
done
grep -h "RESULT\|saved\|wrote the final\|^run:\|^merged\|first step done\|^loaded" "$O"/*.log | cut -c1-300
