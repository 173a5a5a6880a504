#!/usr/bin/env bash
# qlora-train against qlora-bench on equal input (GPU machine, repository root): the bench on
# uniformly random token ids and on the packed Platypus-shaped rows qlora-train reads, then the
# fast configuration (b), all in one call and without the bench's phase synchronizations; the
# final adapter of (b) is written to /dev/shm as well as to the disk, to time the writer apart
# from the disk.
set -u
. tools/gpu/common.sh
t "disk: dd 8 GiB with fdatasync"
dd if=/dev/zero of="$WORK/dd" bs=64M count=128 conv=fdatasync 2>&1 | tail -1
rm -f "$WORK/dd"
stage bench 240 "$B/qlora-bench" $BENCH --bf16_moments --bf16_grads --profile false \
  --json "$O/bench.json"
stage bench_data 240 "$B/qlora-bench" $BENCH --bf16_moments --bf16_grads --profile false \
  --data "$DATA" --tokenizer "$CK" --json "$O/bench_data.json"
stage train_b 420 "$B/qlora-train" --model_name_or_path "$CK" --output_dir /dev/shm/b "${WALK[@]}" \
  "${FAST[@]}" --max_steps 4 --save_strategy no --summary_json "$O/b.json"
ls -la /dev/shm/b | head
rm -rf /dev/shm/b
for f in bench bench_data b; do
  [ -e "$O/$f.json" ] && python3 - "$O/$f.json" "$f" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); n = sys.argv[2]
if n.startswith("bench"):
    print(n, {k: d.get(k) for k in ["tokens_per_s", "peak_mib", "mfu", "matmul_probe_tflops", "median_step_s"]})
    print(n, "steps", [(round(s.get("seconds", 0), 3), s.get("tokens")) for s in d.get("steps", [])])
else:
    keep = ["load_s", "first_step_done_s", "steady_tokens_per_s", "padding_fraction",
            "peak_gpu_mib", "peak_host_rss_bytes", "final_save"]
    print(n, {k: d.get(k) for k in keep})
    print(n, "steps", [(s["step"], round(s["seconds"], 2), s["tokens"], s["padded_tokens"], round(s["loss"], 4)) for s in d.get("steps", [])])
PY
done
