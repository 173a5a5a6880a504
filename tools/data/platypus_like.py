"""Writes an Open-Platypus-shaped parquet (`instruction`, `output`, `input`, `data_source`) of
random English-like text whose token lengths follow a log-normal fit of Open-Platypus under the
reference template (mean about 400 tokens per example with the system prompt, a long tail past
1,024). Deterministic from --seed. Used to run `qlora-train` at full size with real lengths and
padding without downloading the dataset.

    python3 tools/data/platypus_like.py --rows 2000 --out .gpu/platypus_like.parquet
"""
import argparse
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = (
    "the of and to a in is that for it as with be on by this are which an or from at we can if "
    "not all has number function value equation solution triangle probability integer answer "
    "question problem let find given area circle square root sum product prime divisible points "
    "line angle degrees length width height volume rate time distance speed cost price percent "
    "average median mode range set sequence series term ratio fraction decimal positive negative "
    "matrix vector derivative integral limit graph slope intercept polynomial factor remainder "
    "python code returns list string loop variable class method object array index sorted key "
    "because therefore so then first second next finally step explain why how many what when"
).split()


def text(rng, n_words):
    out = []
    for i in range(n_words):
        w = rng.choice(WORDS)
        if rng.random() < 0.08:
            w = str(rng.randint(0, 999))
        out.append(w)
        if rng.random() < 0.07:
            out[-1] += "."
    return " ".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    ins, outs = [], []
    for _ in range(a.rows):
        # Words per part: log-normal (about 1.3 tokens a word with this vocabulary).
        wi = max(3, int(math.exp(rng.gauss(4.1, 0.8))))
        wo = max(3, int(math.exp(rng.gauss(5.02, 0.75))))
        ins.append(text(rng, wi))
        outs.append(text(rng, wo))
    t = pa.table(
        {
            "input": [""] * a.rows,
            "output": outs,
            "instruction": ins,
            "data_source": ["synthetic"] * a.rows,
        }
    )
    pq.write_table(t, a.out)


if __name__ == "__main__":
    main()
