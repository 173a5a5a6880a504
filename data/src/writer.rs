//! Writing records as parquet or JSONL (for fixtures, benchmarks and format conversion).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, LargeStringArray, StringArray, StringViewArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::record::{ColumnNames, Record};

/// The arrow string type parquet columns are written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum StringType {
    /// `Utf8` (32-bit offsets; what `datasets` writes).
    #[default]
    Utf8,
    /// `LargeUtf8` (64-bit offsets).
    LargeUtf8,
    /// `Utf8View`.
    Utf8View,
}

/// Options for [`write_records_parquet`] and [`write_records_jsonl`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOptions {
    /// Column / field names (the input column is written only when named).
    pub columns: ColumnNames,
    /// Rows per parquet row group (default 10 000).
    pub row_group_rows: usize,
    /// Parquet string type (default `Utf8`).
    pub string_type: StringType,
    /// Extra string columns `(name, one value per record)`, written after the standard ones
    /// (e.g. Open-Platypus's `data_source`).
    pub extra_columns: Vec<(String, Vec<String>)>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            columns: ColumnNames::default(),
            row_group_rows: 10_000,
            string_type: StringType::Utf8,
            extra_columns: Vec::new(),
        }
    }
}

impl WriteOptions {
    fn check(&self, n: usize) -> Result<()> {
        self.columns.validate()?;
        if self.row_group_rows == 0 {
            return Err(Error::InvalidConfig("row_group_rows must be > 0".into()));
        }
        for (name, vals) in &self.extra_columns {
            if vals.len() != n {
                return Err(Error::InvalidConfig(format!(
                    "extra column `{name}` has {} values for {n} records",
                    vals.len()
                )));
            }
        }
        Ok(())
    }

    /// `(name, values)` for every column, in Open-Platypus order: input, output, instruction,
    /// extras.
    fn column_values<'a>(&'a self, records: &'a [Record]) -> Vec<(&'a str, Vec<Option<&'a str>>)> {
        let mut cols = Vec::new();
        if let Some(name) = &self.columns.input {
            cols.push((
                name.as_str(),
                records.iter().map(|r| r.input.as_deref()).collect(),
            ));
        }
        cols.push((
            self.columns.output.as_str(),
            records.iter().map(|r| Some(r.output.as_str())).collect(),
        ));
        cols.push((
            self.columns.instruction.as_str(),
            records
                .iter()
                .map(|r| Some(r.instruction.as_str()))
                .collect(),
        ));
        for (name, vals) in &self.extra_columns {
            cols.push((
                name.as_str(),
                vals.iter().map(|v| Some(v.as_str())).collect(),
            ));
        }
        cols
    }
}

/// Writes records to a parquet file (snappy-compressed).
pub fn write_records_parquet(
    path: impl AsRef<Path>,
    records: &[Record],
    options: &WriteOptions,
) -> Result<()> {
    let path = path.as_ref();
    options.check(records.len())?;
    let cols = options.column_values(records);
    let dt = match options.string_type {
        StringType::Utf8 => DataType::Utf8,
        StringType::LargeUtf8 => DataType::LargeUtf8,
        StringType::Utf8View => DataType::Utf8View,
    };
    let schema = Arc::new(Schema::new(
        cols.iter()
            .map(|(name, _)| Field::new(*name, dt.clone(), true))
            .collect::<Vec<_>>(),
    ));
    let arrays: Vec<ArrayRef> = cols
        .into_iter()
        .map(|(_, vals)| -> ArrayRef {
            match options.string_type {
                StringType::Utf8 => Arc::new(StringArray::from(vals)),
                StringType::LargeUtf8 => Arc::new(LargeStringArray::from(vals)),
                StringType::Utf8View => Arc::new(StringViewArray::from(vals)),
            }
        })
        .collect();
    let arrow_err = |source| Error::Arrow {
        path: path.into(),
        source,
    };
    let pq_err = |source| Error::Parquet {
        path: path.into(),
        source,
    };
    let batch = RecordBatch::try_new(schema.clone(), arrays).map_err(arrow_err)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(options.row_group_rows))
        .build();
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut writer = ArrowWriter::try_new(file, schema, Some(props)).map_err(pq_err)?;
    let mut start = 0;
    while start < batch.num_rows() {
        let len = options.row_group_rows.min(batch.num_rows() - start);
        writer.write(&batch.slice(start, len)).map_err(pq_err)?;
        writer.flush().map_err(pq_err)?;
        start += len;
    }
    writer.close().map_err(pq_err)?;
    Ok(())
}

/// Writes records as JSONL, one object per line, keys in the order instruction, input (when
/// named and present), output, extras.
pub fn write_records_jsonl(
    path: impl AsRef<Path>,
    records: &[Record],
    options: &WriteOptions,
) -> Result<()> {
    let path = path.as_ref();
    options.check(records.len())?;
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::new(file);
    let js = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    for (i, r) in records.iter().enumerate() {
        let mut line = format!(
            "{{{}: {}",
            js(&options.columns.instruction),
            js(&r.instruction)
        );
        if let (Some(name), Some(input)) = (&options.columns.input, &r.input) {
            line.push_str(&format!(", {}: {}", js(name), js(input)));
        }
        line.push_str(&format!(
            ", {}: {}",
            js(&options.columns.output),
            js(&r.output)
        ));
        for (name, vals) in &options.extra_columns {
            line.push_str(&format!(", {}: {}", js(name), js(&vals[i])));
        }
        line.push_str("}\n");
        w.write_all(line.as_bytes())
            .map_err(|e| Error::io(path, e))?;
    }
    w.flush().map_err(|e| Error::io(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::{read_records, ReaderConfig};

    #[test]
    fn roundtrip_all_string_types() {
        let dir = tempfile::tempdir().unwrap();
        let recs = vec![
            Record::new("a \"quoted\"\ninstruction", "out\u{3000}1").with_input("x"),
            Record::new("b", "out 2"),
            Record::new("c", ""),
        ];
        for (i, st) in [
            StringType::Utf8,
            StringType::LargeUtf8,
            StringType::Utf8View,
        ]
        .into_iter()
        .enumerate()
        {
            let p = dir.path().join(format!("r{i}.parquet"));
            let opts = WriteOptions {
                string_type: st,
                row_group_rows: 2,
                extra_columns: vec![("data_source".into(), vec!["s".into(); 3])],
                ..Default::default()
            };
            write_records_parquet(&p, &recs, &opts).unwrap();
            // The reader sees the type that was written (the arrow schema is embedded).
            let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                File::open(&p).unwrap(),
            )
            .unwrap();
            let expected = [DataType::Utf8, DataType::LargeUtf8, DataType::Utf8View][i].clone();
            assert_eq!(
                builder
                    .schema()
                    .field_with_name("output")
                    .unwrap()
                    .data_type(),
                &expected
            );
            assert_eq!(builder.metadata().num_row_groups(), 2);
            assert_eq!(
                read_records(&[&p], &ReaderConfig::default()).unwrap(),
                recs,
                "{st:?}"
            );
        }
        let p = dir.path().join("r.jsonl");
        write_records_jsonl(&p, &recs, &WriteOptions::default()).unwrap();
        assert_eq!(read_records(&[&p], &ReaderConfig::default()).unwrap(), recs);
    }

    #[test]
    fn extra_column_length_checked() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WriteOptions {
            extra_columns: vec![("x".into(), vec![])],
            ..Default::default()
        };
        let e = write_records_jsonl(dir.path().join("a.jsonl"), &[Record::new("i", "o")], &opts);
        assert!(matches!(e, Err(Error::InvalidConfig(_))));
    }
}
