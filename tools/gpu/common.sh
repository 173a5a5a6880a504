# Shared by the full-size GPU scripts: the stage runner and the environment.
# Sourced from the repository root on the GPU machine (or here with TINY=1).
B=${B:-.gpu/bin}
O=${OUT:-/tmp/out}
mkdir -p "$O"
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-/tmp/jc}
DATA=${DATA:-.gpu/platypus_like.parquet}
CK=${CK:-/dev/shm/dsm16b}
WORK=${WORK:-/tmp/fs}
mkdir -p "$WORK"
if [ "${TINY:-0}" = 1 ]; then
  PRESET=tiny; BENCH="--preset tiny --batch_size 2 --seq_len 64 --steps 1 --warmup 1"
  SHAPE=(--per_device_train_batch_size 2 --gradient_accumulation_steps 2 --model_max_length 128)
  EVAL=(--model_max_length 128 --per_device_eval_batch_size 2 --max_examples 8)
else
  PRESET=deepseek-moe-16b
  BENCH="--preset 16b --batch_size 16 --seq_len 1024 --steps 3 --warmup 1 --matmul_probe 8192"
  SHAPE=(--per_device_train_batch_size 16 --gradient_accumulation_steps 4 --model_max_length 1024)
  EVAL=(--model_max_length 1024 --per_device_eval_batch_size 8 --max_examples 256)
fi
t() { echo "[$(date +%T)] $*"; }
stage() { # name timeout cmd...
  local name=$1 to=$2; shift 2
  t "START $name: $*"
  local s=$(date +%s%N)
  timeout "$to" "$@" > "$O/$name.log" 2>&1
  local rc=$?
  local e=$(date +%s%N)
  t "END $name rc=$rc $(( (e - s) / 1000000 )) ms"
  tail -n 25 "$O/$name.log" | grep -v "^\s*$" | cut -c1-400
  return $rc
}
# One qlora-bench run at DeepSeekMoE-16B shapes (or BENCH_PRESET's, within BENCH_TIMEOUT
# seconds): bench_run NAME BATCH SEQ FLAGS... (3 timed
# steps after 1 warm-up, JSON in $O/NAME.json); the first run of a call also measures the
# matmul probe. bench_summary KEYS... prints those keys of every $O/*x*_*.json.
probe="--matmul_probe 8192"
bench_run() {
  local name=$1 b=$2 s=$3; shift 3
  stage "$name" "${BENCH_TIMEOUT:-200}" "$B/qlora-bench" --preset "${BENCH_PRESET:-16b}" \
    --batch_size "$b" --seq_len "$s" --steps 3 --warmup 1 "$@" $probe --json "$O/$name.json"
  probe=""
}
bench_summary() {
  for f in "$O"/*x*_*.json; do
    python3 - "$f" "$@" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(sys.argv[1].split("/")[-1], {k: d.get(k) for k in sys.argv[2:]})
PY
  done
}
# The README walkthrough's QLoRA command (reference flags), output dir and data filled in.
WALK=(--data_path "$DATA" --num_train_epochs 3 "${SHAPE[@]}"
  --per_device_eval_batch_size 1 --evaluation_strategy no --save_strategy steps --save_steps 100
  --save_total_limit 100 --learning_rate 2e-5 --warmup_steps 10 --logging_steps 1
  --lr_scheduler_type cosine --gradient_checkpointing True --report_to tensorboard
  --deepspeed configs/ds_config_zero2_no_offload.json --bf16 True --use_lora True --bits 4
  --max_grad_norm 0.3 --double_quant --lora_r 64 --lora_alpha 16 --quant_type nf4)
# The fastest configuration a user can choose with flags.
FAST=(--optim adamw_torch_bf16 --modules_to_save none --packing True)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null
df -h / /dev/shm | tail -2
if [ "${1:-}" != nocheckpoint ]; then
  [ -e "$CK/config.json" ] || stage checkpoint 300 "$B/random-checkpoint" --preset $PRESET --output_dir "$CK"
  du -sh "$CK"
fi
