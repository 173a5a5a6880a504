//! Bad input gives clear errors (file + line / row group + row / column + type) or counted
//! drops, never a panic.

mod common;

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;
use common::deepseek;
use moe_peft_data::{
    read_records, write_records_parquet, DataConfig, Error, InstructionDataset, Location,
    PreprocessConfig, ReaderConfig, Record, Records, WriteOptions,
};

fn write_batch(path: &Path, batch: &RecordBatch) {
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

#[test]
fn malformed_jsonl_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("train.jsonl");
    std::fs::write(
        &p,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"c\", \"output\": \"d\"\n{\"instruction\": \"e\", \"output\": \"f\"}\n",
    )
    .unwrap();
    let e = read_records(&[&p], &ReaderConfig::default()).unwrap_err();
    assert!(
        matches!(e, Error::Json { location: Location::Line(3), ref path, .. } if path == &p),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("train.jsonl") && msg.contains("line 3"),
        "{msg}"
    );
    // The stream yields the good record, then the error, then stops.
    let items: Vec<_> = Records::open(&p, &ReaderConfig::default())
        .unwrap()
        .collect();
    assert_eq!(items.len(), 2);
    assert!(items[0].is_ok() && items[1].is_err());
}

#[test]
fn missing_output_names_field_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("platypus.jsonl");
    std::fs::write(
        &p,
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\", \"input\": \"\"}\n",
    )
    .unwrap();
    let e = read_records(&[&p], &ReaderConfig::default()).unwrap_err();
    match &e {
        Error::MissingField {
            path,
            location,
            field,
        } => {
            assert_eq!(path, &p);
            assert_eq!(*location, Location::Line(2));
            assert_eq!(field, "output");
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("platypus.jsonl: line 2: missing required field `output`"),
        "{msg}"
    );
    // A null is reported as a null (not as an absent key); a wrong type is its own error.
    std::fs::write(&p, "{\"instruction\": \"a\", \"output\": null}\n").unwrap();
    let e = read_records(&[&p], &ReaderConfig::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("field `output` has type null, expected string"),
        "{e}"
    );
    std::fs::write(&p, "{\"instruction\": \"a\", \"output\": [\"b\"]}\n").unwrap();
    let e = read_records(&[&p], &ReaderConfig::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("field `output` has type array, expected string"),
        "{e}"
    );
}

#[test]
fn parquet_wrong_column_type_or_missing_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.parquet");
    let batch = RecordBatch::try_from_iter([
        (
            "instruction",
            Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
        ),
        ("output", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
    ])
    .unwrap();
    write_batch(&p, &batch);
    let e = read_records(&[&p], &ReaderConfig::default()).unwrap_err();
    match &e {
        Error::ColumnType {
            path,
            column,
            found,
            ..
        } => {
            assert_eq!(path, &p);
            assert_eq!(column, "output");
            assert_eq!(found, "Int64");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        e.to_string()
            .contains("column `output` has type Int64, expected a string column"),
        "{e}"
    );

    let p = dir.path().join("missing.parquet");
    let batch = RecordBatch::try_from_iter([
        (
            "instruction",
            Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
        ),
        (
            "response",
            Arc::new(StringArray::from(vec!["b"])) as ArrayRef,
        ),
    ])
    .unwrap();
    write_batch(&p, &batch);
    let e = read_records(&[&p], &ReaderConfig::default()).unwrap_err();
    assert!(
        matches!(&e, Error::MissingColumn { column, available, .. } if column == "output" && available == &["instruction", "response"]),
        "{e:?}"
    );
    // A wrongly typed *optional* column is an error too (it is read when named).
    let p = dir.path().join("input_int.parquet");
    let batch = RecordBatch::try_from_iter([
        (
            "instruction",
            Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
        ),
        ("output", Arc::new(StringArray::from(vec!["b"])) as ArrayRef),
        ("input", Arc::new(Int64Array::from(vec![3])) as ArrayRef),
    ])
    .unwrap();
    write_batch(&p, &batch);
    assert!(matches!(
        read_records(&[&p], &ReaderConfig::default()),
        Err(Error::ColumnType { ref column, .. }) if column == "input"
    ));
}

#[test]
fn parquet_null_names_row_group_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nulls.parquet");
    let outputs: Vec<Option<&str>> = (0..10)
        .map(|i| if i == 6 { None } else { Some("o") })
        .collect();
    let batch = RecordBatch::try_from_iter([
        (
            "instruction",
            Arc::new(StringArray::from(vec!["i"; 10])) as ArrayRef,
        ),
        ("output", Arc::new(StringArray::from(outputs)) as ArrayRef),
    ])
    .unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(4))
        .build();
    let file = std::fs::File::create(&p).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let e = read_records(&[&p], &ReaderConfig::default()).unwrap_err();
    match &e {
        Error::MissingField {
            location, field, ..
        } => {
            assert_eq!(field, "output");
            assert_eq!(
                *location,
                Location::Row {
                    row_group: 1,
                    row: 2,
                    file_row: 6
                }
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        e.to_string().contains(
            "nulls.parquet: row group 1, row 2 (file row 6): missing required field `output`"
        ),
        "{e}"
    );
}

#[test]
fn empty_and_garbage_files() {
    let tok = deepseek();
    let dir = tempfile::tempdir().unwrap();
    let cfg = DataConfig::default();
    // Zero bytes: an error naming the file, for every format.
    for name in ["e.jsonl", "e.json", "e.parquet"] {
        let p = dir.path().join(name);
        std::fs::write(&p, "").unwrap();
        let e = InstructionDataset::load(&[&p], &tok, &cfg).unwrap_err();
        assert!(matches!(e, Error::EmptyFile { .. }), "{e:?}");
        assert!(e.to_string().contains(name), "{e}");
    }
    // Well-formed but without records: NoRecords (when nothing else is read).
    let blank = dir.path().join("blank.jsonl");
    std::fs::write(&blank, "\n  \n").unwrap();
    let empty_array = dir.path().join("empty.json");
    std::fs::write(&empty_array, "[]").unwrap();
    let zero_rows = dir.path().join("zero.parquet");
    write_records_parquet(&zero_rows, &[], &WriteOptions::default()).unwrap();
    for p in [&blank, &empty_array, &zero_rows] {
        let e = InstructionDataset::load(&[p], &tok, &cfg).unwrap_err();
        assert!(
            matches!(e, Error::NoRecords { .. }),
            "{}: {e:?}",
            p.display()
        );
    }
    // ... but fine next to a file that has records.
    let good = dir.path().join("good.jsonl");
    std::fs::write(&good, "{\"instruction\": \"a\", \"output\": \"b\"}\n").unwrap();
    let d = InstructionDataset::load(&[&blank, &good, &zero_rows], &tok, &cfg).unwrap();
    assert_eq!(d.summary.records, 1);
    // Not parquet at all.
    let junk = dir.path().join("junk.parquet");
    std::fs::write(&junk, b"this is not a parquet file, just some text").unwrap();
    let e = read_records(&[&junk], &ReaderConfig::default()).unwrap_err();
    assert!(
        matches!(e, Error::Parquet { .. }) && e.to_string().contains("junk.parquet"),
        "{e}"
    );
    // A JSON file that is not an array is read as JSON Lines, as datasets' json loader does:
    // one object is one record; a line that is not an object is an error naming the line.
    let obj = dir.path().join("obj.json");
    std::fs::write(&obj, "{\"instruction\": \"a\", \"output\": \"b\"}").unwrap();
    assert_eq!(
        read_records(&[&obj], &ReaderConfig::default())
            .unwrap()
            .len(),
        1
    );
    let scalar = dir.path().join("scalar.json");
    std::fs::write(&scalar, "42\n").unwrap();
    let e = read_records(&[&scalar], &ReaderConfig::default()).unwrap_err();
    assert!(
        matches!(e, Error::FieldType { .. }) && e.to_string().contains("scalar.json"),
        "{e}"
    );
    // A path that does not exist.
    let e = read_records(&[dir.path().join("nope.jsonl")], &ReaderConfig::default()).unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("nope.jsonl"),
        "{e}"
    );
}

#[test]
fn prompt_longer_than_max_len_is_a_counted_drop() {
    let tok = deepseek();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("long.parquet");
    let records = vec![
        Record::new("short question", "short answer"),
        Record::new(
            format!("a very long question {}", "blah ".repeat(200)),
            "answer",
        ),
    ];
    write_records_parquet(&p, &records, &WriteOptions::default()).unwrap();
    let cfg = DataConfig {
        preprocess: PreprocessConfig {
            max_len: Some(100),
            progress: false,
            ..Default::default()
        },
        ..Default::default()
    };
    let d = InstructionDataset::load(&[&p], &tok, &cfg).unwrap();
    assert_eq!(d.summary.records, 2);
    assert_eq!(d.summary.examples, 1);
    assert_eq!(d.summary.dropped_prompt_too_long, 1);
    assert!(d.summary.to_string().contains("prompt too long: 1"));
    // If everything is dropped, the dataset is empty and the loader says so.
    let cfg = DataConfig {
        preprocess: PreprocessConfig {
            max_len: Some(10),
            ..cfg.preprocess
        },
        ..cfg
    };
    let d = InstructionDataset::load(&[&p], &tok, &cfg).unwrap();
    assert!(d.is_empty());
    assert_eq!(d.summary.dropped_prompt_too_long, 2);
    assert!(matches!(
        d.loader(Default::default()),
        Err(Error::EmptyDataset)
    ));
}

#[test]
fn invalid_configs_are_errors() {
    let tok = deepseek();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.jsonl");
    std::fs::write(&p, "{\"instruction\": \"a\", \"output\": \"b\"}\n").unwrap();
    let bad_template = DataConfig {
        preprocess: PreprocessConfig {
            template: moe_peft_data::Template::Custom {
                prompt: "{question}".into(),
                target: "{output}".into(),
            },
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(matches!(
        InstructionDataset::load(&[&p], &tok, &bad_template),
        Err(Error::InvalidConfig(_))
    ));
    let unknown = dir.path().join("a.csv");
    std::fs::write(&unknown, "x").unwrap();
    assert!(matches!(
        InstructionDataset::load(&[&unknown], &tok, &DataConfig::default()),
        Err(Error::UnknownFormat { .. })
    ));
}
