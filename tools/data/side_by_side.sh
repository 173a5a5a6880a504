#!/usr/bin/env bash
# The data pipeline against the reference preprocessing, side by side on one generated
# Open-Platypus-shaped parquet: both runs use 2 workers (rayon threads / datasets processes), both
# write their examples, and the ids and label masks must be identical.
#
#   bash tools/data/side_by_side.sh [ROWS] [REPEAT]        (defaults 25000 and 1)
#
# Needs `cargo build --release -p moe-peft-data --example tokenize_bench` and, for Python,
# transformers 4.51.3, datasets 3.6.0 (pip), which load the tokenizer as `LlamaTokenizerFast`
# with BOS as the reference's transformers 4.36 does.
set -euo pipefail
cd "$(dirname "$0")/../.."
rows=${1:-25000}
repeat=${2:-1}
bench=target/release/examples/tokenize_bench
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
echo "date: $(date -u)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
"$bench" --rows "$rows" --save-parquet "$dir/rows.parquet" --generate-only | grep generated
echo "--- Python (finetune.py's preprocessing, datasets.map with num_proc=2)"
python3 tools/data/reference_preprocess.py --input "$dir/rows.parquet" \
    --tokenizer fixtures/tokenizer --num_proc 2 --repeat "$repeat" --ids-out "$dir/python.txt" 2>&1 |
    grep -E '^(python|load|map)'
echo "--- Rust (moe-peft-data, rayon with 2 threads)"
RAYON_NUM_THREADS=2 "$bench" --input "$dir/rows.parquet" --repeat "$repeat" --skip-one-thread \
    --ids-out "$dir/rust.txt" | grep -E '^\| read\+|examples kept|^tokens'
if cmp -s "$dir/python.txt" "$dir/rust.txt"; then
    echo "ids and label masks: identical ($(wc -l < "$dir/rust.txt") examples)"
else
    echo "ids differ:"
    cmp "$dir/python.txt" "$dir/rust.txt" || true
    exit 1
fi
