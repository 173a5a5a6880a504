//! A small deterministic instruction dataset for demos and tests.
//!
//! The tasks are short and rule-based (copy, reverse, first/last word, sort digits, add, count)
//! over a 16-word vocabulary, so a tiny randomly initialised model learns them quickly and the
//! training loss falls visibly within a few hundred steps. The same rows ship as
//! `fixtures/data/tiny_instruct.{jsonl,parquet}` (`tiny_instruct(256, 0)`).

use crate::record::Record;
use crate::rng::SplitMix64;

const WORDS: [&str; 16] = [
    "red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rock",
    "milk", "book", "lamp", "ship",
];

/// The task names, in the order they cycle.
pub const TASKS: [&str; 7] = ["repeat", "reverse", "first", "last", "sort", "add", "count"];

/// `n` records, deterministic in `seed` (the same on every platform and version). Records cycle
/// through [`TASKS`]; `input` is the empty string, as in most Open-Platypus rows.
pub fn tiny_instruct(n: usize, seed: u64) -> Vec<Record> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|i| {
            let (instruction, output) = task(TASKS[i % TASKS.len()], &mut rng);
            Record {
                instruction,
                input: Some(String::new()),
                output,
            }
        })
        .collect()
}

/// The task name of row `i` of [`tiny_instruct`].
pub fn task_of_row(i: usize) -> &'static str {
    TASKS[i % TASKS.len()]
}

fn words(rng: &mut SplitMix64) -> Vec<&'static str> {
    let n = 2 + rng.below(4) as usize;
    (0..n)
        .map(|_| WORDS[rng.below(WORDS.len() as u64) as usize])
        .collect()
}

fn task(name: &str, rng: &mut SplitMix64) -> (String, String) {
    match name {
        "repeat" => {
            let w = words(rng).join(" ");
            (format!("Repeat the words: {w}"), w)
        }
        "reverse" => {
            let w = words(rng);
            let rev: Vec<_> = w.iter().rev().copied().collect();
            (format!("Reverse the words: {}", w.join(" ")), rev.join(" "))
        }
        "first" => {
            let w = words(rng);
            (
                format!("Say the first word: {}", w.join(" ")),
                w[0].to_string(),
            )
        }
        "last" => {
            let w = words(rng);
            (
                format!("Say the last word: {}", w.join(" ")),
                w[w.len() - 1].to_string(),
            )
        }
        "sort" => {
            let n = 3 + rng.below(3) as usize;
            let mut d: Vec<u64> = (0..n).map(|_| rng.below(10)).collect();
            let shown: Vec<String> = d.iter().map(u64::to_string).collect();
            d.sort_unstable();
            let sorted: Vec<String> = d.iter().map(u64::to_string).collect();
            (
                format!("Sort the digits: {}", shown.join(" ")),
                sorted.join(" "),
            )
        }
        "add" => {
            let a = rng.below(50);
            let b = rng.below(50);
            (format!("Add the numbers: {a} + {b}"), (a + b).to_string())
        }
        _ => {
            let w = words(rng);
            (
                format!("Count the words: {}", w.join(" ")),
                w.len().to_string(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_correct() {
        let a = tiny_instruct(70, 5);
        assert_eq!(a, tiny_instruct(70, 5));
        assert_ne!(a, tiny_instruct(70, 6));
        for (i, r) in a.iter().enumerate() {
            let args = r.instruction.split_once(": ").unwrap().1;
            match task_of_row(i) {
                "repeat" => assert_eq!(r.output, args),
                "reverse" => {
                    let mut w: Vec<_> = args.split(' ').collect();
                    w.reverse();
                    assert_eq!(r.output, w.join(" "));
                }
                "first" => assert_eq!(r.output, args.split(' ').next().unwrap()),
                "last" => assert_eq!(r.output, args.split(' ').next_back().unwrap()),
                "sort" => {
                    let mut d: Vec<_> = args.split(' ').collect();
                    d.sort();
                    assert_eq!(r.output, d.join(" "));
                }
                "add" => {
                    let (x, y) = args.split_once(" + ").unwrap();
                    let s: u64 = x.parse::<u64>().unwrap() + y.parse::<u64>().unwrap();
                    assert_eq!(r.output, s.to_string());
                }
                "count" => assert_eq!(r.output, args.split(' ').count().to_string()),
                t => panic!("unknown task {t}"),
            }
        }
    }
}
