//! Fuzzing `adapter_config.json` parsing (proptest): mutations of PEFT's config give a config
//! or an error, never a panic. `PROPTEST_CASES` cases (64 by default here).

use std::path::Path;

use moe_peft_lora::LoraConfig;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn mutated_adapter_config_never_panics(
        edits in proptest::collection::vec((any::<usize>(), 0x20u8..0x7f), 0..8),
    ) {
        let f = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/lora/adapter/adapter_config.json");
        let mut b = std::fs::read(f).unwrap();
        for (i, v) in edits {
            let n = b.len();
            b[i % n] = v;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("adapter_config.json");
        std::fs::write(&p, &b).unwrap();
        if let Ok(c) = LoraConfig::from_file(&p) {
            let _ = c.validate();
        }
    }
}
