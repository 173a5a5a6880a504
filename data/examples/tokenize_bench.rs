//! Throughput of read + template + tokenize + mask on an Open-Platypus-sized dataset.
//!
//! Generates `--rows` (default 25 000) records with instructions of 100–300 words and outputs of
//! 100–400 words, writes them to a temporary directory as parquet and JSONL, then times:
//! reading alone, the full [`InstructionDataset::load`] pipeline (reference template, DeepSeek
//! tokenizer, masking; rayon over all cores, and on one thread for scaling), and one epoch of
//! batching.
//!
//! Pipeline runs are repeated (`--repeat`, default 2) and the best wall time is reported, with
//! the CPU seconds of that run (the machine may be shared).
//!
//! `cargo run --release -p moe-peft-data --example tokenize_bench [-- --rows N --max-len L --repeat R]`;
//! `--input FILE` times a data file of your own instead; an unknown flag is an error.

use std::time::Instant;

/// mimalloc instead of the system allocator: tokenization allocates a small string per
/// pre-token, and glibc's malloc takes a large share of its time. The programs use it too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use moe_peft_data::{
    read_records, write_records_jsonl, write_records_parquet, DataConfig, InstructionDataset,
    LoaderConfig, PreprocessConfig, ReaderConfig, Record, SplitMix64, TextTokenizer, WriteOptions,
    IGNORE_INDEX,
};

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "be",
    "on",
    "by",
    "this",
    "are",
    "which",
    "an",
    "or",
    "from",
    "at",
    "we",
    "can",
    "if",
    "not",
    "all",
    "has",
    "number",
    "function",
    "value",
    "equation",
    "solution",
    "triangle",
    "probability",
    "integer",
    "answer",
    "question",
    "problem",
    "first",
    "second",
    "each",
    "therefore",
    "since",
    "because",
    "find",
    "given",
    "let",
    "consider",
    "sum",
    "product",
    "area",
    "length",
    "angle",
    "point",
    "line",
    "circle",
    "square",
    "root",
    "term",
    "sequence",
    "series",
    "prime",
    "factor",
    "divisor",
    "remainder",
    "polynomial",
    "coefficient",
    "variable",
    "expression",
    "simplify",
    "compute",
    "evaluate",
    "determine",
    "prove",
    "assume",
    "suppose",
    "then",
    "thus",
    "hence",
    "so",
    "also",
    "however",
    "example",
    "result",
    "method",
    "approach",
    "step",
    "case",
    "condition",
    "model",
    "data",
    "system",
    "energy",
    "force",
    "mass",
    "velocity",
    "acceleration",
    "temperature",
    "pressure",
    "molecule",
    "reaction",
    "cell",
    "protein",
    "gene",
    "species",
    "population",
    "economic",
    "market",
    "price",
    "policy",
    "argument",
    "premise",
    "conclusion",
    "evidence",
    "statement",
    "logical",
    "inference",
    "hypothesis",
    "theory",
    "experiment",
    "observation",
    "program",
    "algorithm",
    "array",
    "string",
    "loop",
    "return",
    "class",
    "object",
    "method",
    "input",
    "output",
    "recursion",
    "complexity",
    "memory",
    "pointer",
    "matrix",
    "vector",
    "derivative",
    "integral",
    "limit",
    "graph",
    "slope",
    "intercept",
    "minimum",
    "maximum",
    "positive",
    "negative",
    "real",
    "complex",
    "rational",
    "odd",
    "even",
    "distinct",
    "possible",
    "correct",
    "incorrect",
    "following",
    "options",
    "choose",
    "explain",
    "describe",
    "analysis",
    "important",
    "different",
    "similar",
    "large",
    "small",
    "total",
    "average",
    "rate",
    "time",
    "distance",
    "speed",
    "volume",
    "radius",
    "diameter",
    "perimeter",
    "coordinates",
    "origin",
];

fn text(rng: &mut SplitMix64, min_words: u64, max_words: u64) -> String {
    let n = min_words + rng.below(max_words - min_words + 1);
    let mut s = String::with_capacity(n as usize * 7);
    let mut sentence = 0;
    for i in 0..n {
        if i > 0 {
            s.push(if sentence > 0 && rng.below(40) == 0 {
                '\n'
            } else {
                ' '
            });
        }
        match rng.below(20) {
            0 => s.push_str(&rng.below(10_000).to_string()),
            1 => s.push_str(&format!("$x^{} + {}$", rng.below(5), rng.below(100))),
            _ => {
                let w = WORDS[rng.below(WORDS.len() as u64) as usize];
                if sentence == 0 {
                    let mut c = w.chars();
                    if let Some(f) = c.next() {
                        s.extend(f.to_uppercase());
                        s.push_str(c.as_str());
                    }
                } else {
                    s.push_str(w);
                }
            }
        }
        sentence += 1;
        if rng.below(12) == 0 {
            s.push(if rng.below(5) == 0 { ',' } else { '.' });
            sentence = 0;
        }
    }
    s.push('.');
    s
}

fn records(n: usize) -> Vec<Record> {
    let mut rng = SplitMix64::new(2024);
    (0..n)
        .map(|_| {
            let instruction = text(&mut rng, 100, 300);
            let output = text(&mut rng, 100, 400);
            Record::new(instruction, output).with_input("")
        })
        .collect()
}

/// CPU seconds used by this process so far (all threads; Linux `/proc/self/stat`, 100 Hz ticks),
/// so that throughput per CPU-second can be reported on a shared machine.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Writes one line per example: `source_len id id ...`.
fn write_ids(path: &std::path::Path, dataset: &InstructionDataset) -> anyhow::Result<()> {
    use std::io::Write;
    let file = std::fs::File::create(path)
        .map_err(|e| anyhow::anyhow!("--ids-out {}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for e in &dataset.examples {
        let n_masked = e.labels.iter().take_while(|&&l| l == IGNORE_INDEX).count();
        write!(w, "{n_masked}")?;
        for id in &e.input_ids {
            write!(w, " {id}")?;
        }
        writeln!(w)?;
    }
    w.flush()?;
    Ok(())
}

/// Throughput of read + template + tokenize + mask.
#[derive(clap::Parser, Debug)]
#[command(name = "tokenize_bench")]
struct Args {
    /// Generated rows (ignored with --input).
    #[arg(long, default_value_t = 25_000)]
    rows: usize,
    /// Longest example in tokens.
    #[arg(long = "max-len", default_value_t = 1024)]
    max_len: usize,
    /// Pipeline runs per row of the table; the best wall time is reported.
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Time this data file (parquet, JSONL or JSON) instead of generated rows.
    #[arg(long)]
    input: Option<std::path::PathBuf>,
    /// Also keep the generated parquet at this path (to time another pipeline on the same rows).
    #[arg(long = "save-parquet")]
    save_parquet: Option<std::path::PathBuf>,
    /// Write the examples of the first pipeline run, one line each: `source_len id id ...`
    /// (the labels are the ids with the first source_len replaced by -100).
    #[arg(long = "ids-out")]
    ids_out: Option<std::path::PathBuf>,
    /// Write the generated rows (needs --save-parquet) and stop.
    #[arg(long = "generate-only")]
    generate_only: bool,
    /// Leave out the one-thread row of the table.
    #[arg(long = "skip-one-thread")]
    skip_one_thread: bool,
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    if args.generate_only && args.save_parquet.is_none() {
        anyhow::bail!("--generate-only needs --save-parquet PATH");
    }
    let (rows, max_len, repeat) = (args.rows, args.max_len, args.repeat.max(1));
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures");
    let tokenizer = TextTokenizer::from_dir(format!("{root}/tokenizer"))?;
    let dir = tempfile::tempdir()?;
    let parquet = dir.path().join("platypus_like.parquet");
    let jsonl = dir.path().join("platypus_like.jsonl");

    let inputs: Vec<(String, std::path::PathBuf)> = match &args.input {
        Some(p) => {
            if !p.exists() {
                anyhow::bail!("--input {}: no such file", p.display());
            }
            let name = p
                .extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_else(|| "input".into());
            println!("input: {}", p.display());
            vec![(name, p.clone())]
        }
        None => {
            let t = Instant::now();
            let recs = records(rows);
            let words: usize = recs
                .iter()
                .map(|r| {
                    r.instruction.split_whitespace().count() + r.output.split_whitespace().count()
                })
                .sum();
            write_records_parquet(&parquet, &recs, &WriteOptions::default())?;
            write_records_jsonl(&jsonl, &recs, &WriteOptions::default())?;
            drop(recs);
            if let Some(keep) = &args.save_parquet {
                std::fs::copy(&parquet, keep)
                    .map_err(|e| anyhow::anyhow!("--save-parquet {}: {e}", keep.display()))?;
                println!("generated rows kept in {}", keep.display());
            }
            if args.generate_only {
                return Ok(());
            }
            println!(
                "generated {rows} rows ({:.0} words/row) in {:.2}s: parquet {:.1} MB, jsonl {:.1} MB",
                words as f64 / rows as f64,
                t.elapsed().as_secs_f64(),
                std::fs::metadata(&parquet)?.len() as f64 / 1e6,
                std::fs::metadata(&jsonl)?.len() as f64 / 1e6,
            );
            vec![
                ("parquet".into(), parquet.clone()),
                ("jsonl".into(), jsonl.clone()),
            ]
        }
    };
    println!(
        "rayon threads: {}, max_len {max_len}\n",
        rayon::current_num_threads()
    );

    println!(
        "| stage | input | threads | wall s (best of {repeat}) | CPU s | examples/s | tokens/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, path) in &inputs {
        let t = Instant::now();
        let n = read_records(&[path], &ReaderConfig::default())?.len();
        let s = t.elapsed().as_secs_f64();
        println!(
            "| read only | {name} | 1 | {s:.2} | - | {:.0} | - |",
            n as f64 / s
        );
    }
    let config = DataConfig {
        preprocess: PreprocessConfig {
            max_len: Some(max_len),
            progress: false,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut dataset = None;
    let threads = rayon::current_num_threads();
    let mut runs: Vec<(&str, &std::path::PathBuf, usize)> = inputs
        .iter()
        .map(|(n, p)| (n.as_str(), p, threads))
        .collect();
    if !args.skip_one_thread {
        runs.push((inputs[0].0.as_str(), &inputs[0].1, 1));
    }
    for (name, path, n_threads) in runs {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n_threads)
            .build()?;
        let (mut best, mut cpu, mut d) = (f64::INFINITY, f64::NAN, None);
        for _ in 0..repeat {
            let (t, c0) = (Instant::now(), cpu_seconds());
            let run = pool.install(|| InstructionDataset::load(&[path], &tokenizer, &config))?;
            let s = t.elapsed().as_secs_f64();
            if s < best {
                best = s;
                cpu = match (c0, cpu_seconds()) {
                    (Some(a), Some(b)) => b - a,
                    _ => f64::NAN,
                };
            }
            d = Some(run);
        }
        let d = d.ok_or_else(|| anyhow::anyhow!("no run"))?;
        println!(
            "| read+template+tokenize+mask | {name} | {n_threads} | {best:.2} | {cpu:.1} | {:.0} | {:.0} |",
            d.summary.records as f64 / best,
            d.summary.total_tokens as f64 / best
        );
        if dataset.is_none() {
            dataset = Some(d);
        } else if n_threads == threads {
            assert_eq!(
                dataset.as_ref().map(|x| &x.examples),
                Some(&d.examples),
                "formats disagree"
            );
        }
    }
    let dataset = dataset.ok_or_else(|| anyhow::anyhow!("no run"))?;
    if let Some(out) = &args.ids_out {
        write_ids(out, &dataset)?;
        println!("examples written to {}", out.display());
    }
    println!(
        "\nsummary (tokens/s above count kept tokens after truncation; {}):\n{}\n",
        if tokenizer.splits_at_line_breaks() {
            "line breaks are token boundaries, so each text is tokenized once and the template's constant prefix once in all"
        } else {
            "each record's prompt is tokenized twice, alone and inside the full text, as in the reference"
        },
        dataset.summary
    );

    let t = Instant::now();
    let loader = dataset.loader(LoaderConfig::default().batch_size(16))?;
    let (mut batches, mut padded) = (0usize, 0usize);
    for b in loader {
        batches += 1;
        padded += b.n_padded_tokens();
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "loader: {batches} batches of 16 (shuffled, padded to longest) in {s:.3}s = {:.0} batches/s, {:.0} padded tokens/s",
        batches as f64 / s,
        padded as f64 / s
    );
    Ok(())
}
