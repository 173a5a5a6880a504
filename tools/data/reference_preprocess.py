"""The reference preprocessing of DeepSeek-MoE's `finetune/finetune.py`, timed.

Loads a parquet file with `datasets.load_dataset("parquet")`, loads the tokenizer with
`AutoTokenizer.from_pretrained(dir, use_fast=True, model_max_length=L)`, and runs
`dataset.map(train_tokenize_function, batched=True, batch_size=3000, num_proc=N)` with the
script's own template, `_tokenize_fn` and `preprocess` (copied below). The map's cache is off,
so every run tokenizes. Prints the wall time of the map and, with --ids-out, writes one line per
example: `source_len id id ...` (the labels are the ids with the first source_len set to -100).

    python3 tools/data/reference_preprocess.py --input rows.parquet \
        --tokenizer fixtures/tokenizer --num_proc 2 --ids-out /tmp/python_ids.txt

Versions used for BENCHMARKS.md are printed on the first line.
"""
import argparse
import copy
import sys
import time

import datasets
import tokenizers
import transformers
from transformers import AutoTokenizer

IGNORE_INDEX = -100
EOT_TOKEN = "<|EOT|>"


def build_instruction_prompt(instruction: str):
    return '''
You are an AI assistant, developed by DeepSeek Company. For politically sensitive questions, security and privacy issues, you will refuse to answer.
### Instruction:
{}
### Response:
'''.format(instruction.strip()).lstrip()


def _tokenize_fn(strings, tokenizer):
    tokenized_list = [
        tokenizer(text, max_length=tokenizer.model_max_length, truncation=True) for text in strings
    ]
    input_ids = labels = [tokenized.input_ids for tokenized in tokenized_list]
    input_ids_lens = labels_lens = [len(tokenized.input_ids) for tokenized in tokenized_list]
    return dict(
        input_ids=input_ids,
        labels=labels,
        input_ids_lens=input_ids_lens,
        labels_lens=labels_lens,
    )


def preprocess(sources, targets, tokenizer):
    examples = [s + t for s, t in zip(sources, targets)]
    examples_tokenized, sources_tokenized = [
        _tokenize_fn(strings, tokenizer) for strings in (examples, sources)
    ]
    input_ids = examples_tokenized["input_ids"]
    labels = copy.deepcopy(input_ids)
    for label, source_len in zip(labels, sources_tokenized["input_ids_lens"]):
        label[:source_len] = [IGNORE_INDEX] * min(source_len, len(label))
    return dict(input_ids=input_ids, labels=labels)


def train_tokenize_function(examples, tokenizer):
    sources = [build_instruction_prompt(instruction) for instruction in examples["instruction"]]
    targets = [f"{output}\n{EOT_TOKEN}" for output in examples["output"]]
    return preprocess(sources, targets, tokenizer)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--max_len", type=int, default=1024)
    ap.add_argument("--num_proc", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--ids-out")
    a = ap.parse_args()
    print(
        f"python {sys.version.split()[0]}, transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}, datasets {datasets.__version__}",
        flush=True,
    )
    datasets.disable_caching()
    t = time.time()
    raw = datasets.load_dataset("parquet", data_files=a.input, split="train")
    tokenizer = AutoTokenizer.from_pretrained(
        a.tokenizer, use_fast=True, trust_remote_code=True, model_max_length=a.max_len
    )
    print(f"load: {len(raw)} rows in {time.time() - t:.2f}s", flush=True)
    best = float("inf")
    for _ in range(max(1, a.repeat)):
        t = time.time()
        ds = raw.map(
            train_tokenize_function,
            batched=True,
            batch_size=3000,
            num_proc=a.num_proc,
            remove_columns=raw.column_names,
            load_from_cache_file=False,
            desc="Running Encoding",
            fn_kwargs={"tokenizer": tokenizer},
        )
        best = min(best, time.time() - t)
    n_tokens = sum(len(x) for x in ds["input_ids"])
    print(
        f"map: {len(ds)} examples, {n_tokens} tokens, best of {max(1, a.repeat)}: {best:.2f}s = "
        f"{len(ds) / best:.0f} examples/s, {n_tokens / best:.0f} tokens/s",
        flush=True,
    )
    if a.ids_out:
        with open(a.ids_out, "w") as f:
            for ids, labels in zip(ds["input_ids"], ds["labels"]):
                n = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))
                f.write(" ".join(map(str, [n] + list(ids))) + "\n")


if __name__ == "__main__":
    main()
