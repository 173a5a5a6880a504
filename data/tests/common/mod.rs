//! Shared helpers for the integration tests.
#![allow(dead_code)]

use moe_peft_data::TextTokenizer;

/// `fixtures/` of the repository.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures");

/// A path under `fixtures/`.
pub fn fixture(rel: &str) -> String {
    format!("{FIXTURES}/{rel}")
}

/// The DeepSeek tokenizer with its `tokenizer_config.json`.
pub fn deepseek() -> TextTokenizer {
    TextTokenizer::from_dir(fixture("tokenizer")).expect("fixture tokenizer loads")
}

/// The raw `tokenizers` tokenizer (no config, no BOS).
pub fn raw() -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(fixture("tokenizer/tokenizer.json"))
        .expect("raw tokenizer loads")
}

/// A JSON fixture.
pub fn json(rel: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(rel)).expect("fixture readable");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// A JSON array of integers as `Vec<i64>`.
pub fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("integer"))
        .collect()
}

/// A JSON array of integers as `Vec<u32>`.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    ints(v)
        .into_iter()
        .map(|x| u32::try_from(x).expect("u32"))
        .collect()
}
