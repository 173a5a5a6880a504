#!/usr/bin/env bash
# The walkthrough at full size, part 4 (GPU machine, repository root): the disk's speed,
# qlora-bench and the fast configuration (b) in one call again, and the checkpoint saves of (b)
# and of the reference flags (a) with the adapter and optimizer files written side by side.
set -u
. tools/gpu/common.sh
t "disk: dd 8 GiB with fdatasync"
dd if=/dev/zero of="$WORK/dd" bs=64M count=128 conv=fdatasync 2>&1 | tail -1
rm -f "$WORK/dd"
stage bench 240 "$B/qlora-bench" $BENCH --bf16_moments --bf16_grads --json "$O/bench.json"
stage train_b 420 "$B/qlora-train" --model_name_or_path "$CK" --output_dir "$WORK/b" "${WALK[@]}" \
  "${FAST[@]}" --max_steps 4 --save_steps 2 --save_total_limit 1 --summary_json "$O/b.json"
rm -rf "$WORK/b"
stage train_a 420 "$B/qlora-train" --model_name_or_path "$CK" --output_dir "$WORK/a" "${WALK[@]}" \
  --max_steps 1 --save_steps 1 --summary_json "$O/a.json"
rm -rf "$WORK/a"
grep -h "RESULT\|saved\|wrote the final\|^run:\|first step done\|^loaded\|^step " "$O"/*.log | cut -c1-300
