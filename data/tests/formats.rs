//! Parquet, JSONL and JSON inputs of the same rows give identical records and examples.

mod common;

use std::sync::Arc;

use common::{deepseek, fixture};
use moe_peft_data::synthetic::tiny_instruct;
use moe_peft_data::{
    read_records, write_records_jsonl, write_records_parquet, DataConfig, DataFormat,
    InstructionDataset, PreprocessConfig, ReaderConfig, Record, StringType, WriteOptions,
};

fn quiet() -> DataConfig {
    DataConfig {
        preprocess: PreprocessConfig {
            progress: false,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn shipped_fixture_parquet_and_jsonl_are_identical() {
    let tok = deepseek();
    let cfg = ReaderConfig::default();
    let from_jsonl = read_records(&[fixture("data/tiny_instruct.jsonl")], &cfg).unwrap();
    let from_parquet = read_records(&[fixture("data/tiny_instruct.parquet")], &cfg).unwrap();
    assert_eq!(from_jsonl.len(), 256);
    assert_eq!(from_jsonl, from_parquet);
    // The shipped files are exactly the synthetic generator's output.
    assert_eq!(from_jsonl, tiny_instruct(256, 0));

    let a =
        InstructionDataset::load(&[fixture("data/tiny_instruct.jsonl")], &tok, &quiet()).unwrap();
    let b =
        InstructionDataset::load(&[fixture("data/tiny_instruct.parquet")], &tok, &quiet()).unwrap();
    assert_eq!(a.examples.len(), 256);
    assert_eq!(a, b);
}

fn varied_records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let r = Record::new(
                format!(
                    "  Instruction {i}: explain «{}» in détail.\n",
                    "x".repeat(i % 13)
                ),
                format!("Answer {i}\nwith a second line and 中文 {}", i * 7),
            );
            match i % 3 {
                0 => r.with_input(format!("context {i}")),
                1 => r.with_input(""),
                _ => r,
            }
        })
        .collect()
}

#[test]
fn all_formats_and_string_types_agree() {
    let tok = deepseek();
    let dir = tempfile::tempdir().unwrap();
    let records = varied_records(100);
    let jsonl = dir.path().join("d.jsonl");
    write_records_jsonl(&jsonl, &records, &WriteOptions::default()).unwrap();
    let json = dir.path().join("d.json");
    let array: Vec<serde_json::Value> = records
        .iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .collect();
    std::fs::write(&json, serde_json::to_string_pretty(&array).unwrap()).unwrap();
    let mut paths = vec![jsonl.clone(), json.clone()];
    for (i, st) in [
        StringType::Utf8,
        StringType::LargeUtf8,
        StringType::Utf8View,
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.path().join(format!("d{i}.parquet"));
        let opts = WriteOptions {
            string_type: st,
            row_group_rows: 7, // many row groups, last one partial
            ..Default::default()
        };
        write_records_parquet(&p, &records, &opts).unwrap();
        paths.push(p);
    }
    let reference = InstructionDataset::load(&[&jsonl], &tok, &quiet()).unwrap();
    assert_eq!(reference.summary.records, 100);
    for p in &paths {
        assert_eq!(
            read_records(&[p], &ReaderConfig::default()).unwrap(),
            records,
            "{}",
            p.display()
        );
        let d = InstructionDataset::load(&[p], &tok, &quiet()).unwrap();
        assert_eq!(d, reference, "{}", p.display());
    }
}

#[test]
fn directories_and_several_files() {
    let tok = deepseek();
    let dir = tempfile::tempdir().unwrap();
    let records = varied_records(30);
    write_records_parquet(
        dir.path().join("a.parquet"),
        &records[..10],
        &WriteOptions::default(),
    )
    .unwrap();
    write_records_jsonl(
        dir.path().join("b.jsonl"),
        &records[10..],
        &WriteOptions::default(),
    )
    .unwrap();
    std::fs::write(dir.path().join("README.md"), "ignored").unwrap();
    assert_eq!(
        read_records(&[dir.path()], &ReaderConfig::default()).unwrap(),
        records
    );
    let both = [dir.path().join("a.parquet"), dir.path().join("b.jsonl")];
    assert_eq!(
        read_records(&both, &ReaderConfig::default()).unwrap(),
        records
    );
    let from_dir = InstructionDataset::load(&[dir.path()], &tok, &quiet()).unwrap();
    let from_mem = InstructionDataset::from_records(&records, &tok, &quiet().preprocess).unwrap();
    assert_eq!(from_dir, from_mem);
}

#[test]
fn forced_format_and_dictionary_columns() {
    use arrow::array::{ArrayRef, DictionaryArray, StringArray};
    use arrow::datatypes::Int32Type;
    use arrow::record_batch::RecordBatch;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    let output: DictionaryArray<Int32Type> = vec!["yes", "no", "yes"].into_iter().collect();
    let batch = RecordBatch::try_from_iter([
        (
            "instruction",
            Arc::new(StringArray::from(vec!["a", "b", "c"])) as ArrayRef,
        ),
        ("output", Arc::new(output) as ArrayRef),
        (
            "input",
            Arc::new(StringArray::from(vec![Some("x"), None, Some("")])) as ArrayRef,
        ),
    ])
    .unwrap();
    let file = std::fs::File::create(&path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let cfg = ReaderConfig {
        format: Some(DataFormat::Parquet),
        ..Default::default()
    };
    let recs = read_records(&[&path], &cfg).unwrap();
    assert_eq!(
        recs,
        vec![
            Record::new("a", "yes").with_input("x"),
            Record::new("b", "no"),
            Record::new("c", "yes").with_input(""),
        ]
    );
    // Not reading `input` at all.
    let cfg = ReaderConfig {
        format: Some(DataFormat::Parquet),
        columns: moe_peft_data::ColumnNames {
            input: None,
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(read_records(&[&path], &cfg)
        .unwrap()
        .iter()
        .all(|r| r.input.is_none()));
}
