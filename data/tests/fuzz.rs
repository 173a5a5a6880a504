//! Fuzzing the readers (proptest): arbitrary bytes, and mutations of valid files, under the
//! JSONL, JSON and parquet readers give records or an error, never a panic. The suite runs
//! `PROPTEST_CASES` cases per property (64 by default here); a long run sets it higher.

use std::path::Path;

use moe_peft_data::{read_records, ReaderConfig};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// Reads `bytes` as a file named `name`; any outcome but a panic is fine.
fn read(dir: &Path, name: &str, bytes: &[u8]) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let _ = read_records(&[&p], &ReaderConfig::default());
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/data")
            .join(name),
    )
    .unwrap()
}

/// `base` with `edits` applied: (position, byte) overwrites, then a cut at `cut` (as a share).
fn mutate(base: &[u8], edits: &[(usize, u8)], cut: f64) -> Vec<u8> {
    let mut b = base.to_vec();
    for &(i, v) in edits {
        if !b.is_empty() {
            let n = b.len();
            b[i % n] = v;
        }
    }
    let keep = ((b.len() as f64) * cut).round() as usize;
    b.truncate(keep.max(1).min(b.len()));
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let dir = tempfile::tempdir().unwrap();
        for name in ["x.jsonl", "x.json", "x.parquet"] {
            read(dir.path(), name, &bytes);
        }
    }

    #[test]
    fn json_shaped_text_never_panics(text in r#"[\[\]{}",:0-9a-z \n\\-]{0,400}"#) {
        let dir = tempfile::tempdir().unwrap();
        read(dir.path(), "t.jsonl", text.as_bytes());
        read(dir.path(), "t.json", text.as_bytes());
    }

    #[test]
    fn mutated_valid_files_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..16),
        cut in 0.0f64..=1.0,
    ) {
        let dir = tempfile::tempdir().unwrap();
        for (name, out) in [
            ("tiny_instruct.jsonl", "m.jsonl"),
            ("tiny_instruct.parquet", "m.parquet"),
        ] {
            read(dir.path(), out, &mutate(&fixture(name), &edits, cut));
        }
    }
}
