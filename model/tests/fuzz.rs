//! Fuzzing the checkpoint and config readers (proptest): arbitrary bytes and mutations of a
//! valid safetensors file or config.json give a model, a checkpoint or an error, never a panic.
//! `PROPTEST_CASES` cases per property (64 by default here).

use std::path::{Path, PathBuf};

use moe_peft_model::{Checkpoint, DeepSeekMoeConfig};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/tiny_deepseek_moe")
        .join(name)
}

/// The first `len` bytes of `f` (the safetensors header and a little data).
fn head(f: &Path, len: usize) -> Vec<u8> {
    let mut b = std::fs::read(f).unwrap();
    b.truncate(len);
    b
}

/// Opens `bytes` as a checkpoint file and reads every tensor it lists.
fn open(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    std::fs::write(&p, bytes).unwrap();
    if let Ok(ck) = Checkpoint::open_files(std::slice::from_ref(&p)) {
        for name in ck.names() {
            let _ = ck.get_raw(&name, &candle_core::Device::Cpu);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_safetensors_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        open(&bytes);
    }

    #[test]
    fn mutated_safetensors_headers_never_panic(
        edits in proptest::collection::vec((0usize..4096, any::<u8>()), 1..12),
        len in 8usize..6000,
    ) {
        // The header (a u64 length, then JSON with dtypes, shapes and offsets) of the fixture.
        let mut b = head(&fixture("model.safetensors"), 1 << 16);
        for (i, v) in edits {
            let n = b.len();
            b[i % n] = v;
        }
        let keep = len.min(b.len());
        b.truncate(keep);
        open(&b);
    }

    #[test]
    fn mutated_config_json_never_panics(
        edits in proptest::collection::vec((any::<usize>(), 0x20u8..0x7f), 0..8),
    ) {
        let mut b = std::fs::read(fixture("config.json")).unwrap();
        for (i, v) in edits {
            let n = b.len();
            b[i % n] = v;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, &b).unwrap();
        if let Ok(cfg) = DeepSeekMoeConfig::from_file(&p) {
            let _ = cfg.validate();
        }
    }
}
