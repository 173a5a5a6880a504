//! Writes `fixtures/data/tiny_instruct.{jsonl,parquet}`: `synthetic::tiny_instruct(256, 0)` with an
//! Open-Platypus-like `data_source` column (`synthetic/<task>`).
//!
//! `cargo run --release -p moe-peft-data --example make_tiny_fixture`

use moe_peft_data::synthetic::{task_of_row, tiny_instruct};
use moe_peft_data::{write_records_jsonl, write_records_parquet, WriteOptions};

/// Rows in the shipped fixture.
const ROWS: usize = 256;
/// Seed of the shipped fixture.
const SEED: u64 = 0;

fn main() -> anyhow::Result<()> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/data");
    std::fs::create_dir_all(dir)?;
    let records = tiny_instruct(ROWS, SEED);
    let options = WriteOptions {
        extra_columns: vec![(
            "data_source".into(),
            (0..ROWS)
                .map(|i| format!("synthetic/{}", task_of_row(i)))
                .collect(),
        )],
        ..Default::default()
    };
    write_records_jsonl(format!("{dir}/tiny_instruct.jsonl"), &records, &options)?;
    write_records_parquet(format!("{dir}/tiny_instruct.parquet"), &records, &options)?;
    println!("wrote {ROWS} rows to {dir}/tiny_instruct.{{jsonl,parquet}}");
    Ok(())
}
