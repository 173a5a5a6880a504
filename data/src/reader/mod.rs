//! Streaming readers for parquet, JSONL and JSON-array instruction files, one file per format:
//!
//! - **Parquet** (`parquet.rs`) is read one row group at a time through parquet's arrow reader,
//!   projecting only the configured columns. String columns may be `Utf8`, `LargeUtf8`, `Utf8View`
//!   or a dictionary of `Utf8`/`LargeUtf8`. This is what `datasets`' `load_dataset('parquet', ...)`
//!   reads in the reference script (Open-Platypus on the Hub is parquet with columns `input`,
//!   `output`, `instruction`, `data_source`).
//! - **JSONL** (`jsonl.rs`) is read line by line; blank lines are skipped; each line must be a JSON
//!   object.
//! - **JSON** (`json.rs`) is one top-level array of objects (the whole file is parsed at once).
//!
//! This file holds what they share: [`DataFormat`] and its detection from the file extension,
//! [`ReaderConfig`], the entry points [`expand_inputs`], [`read_records`] and [`Records`], and the
//! conversion of one JSON object into a [`Record`] used by both JSON formats.
//!
//! A required field that is absent or null is [`Error::MissingField`]; a field of the wrong type is
//! [`Error::FieldType`] (JSON) or [`Error::ColumnType`] (parquet, checked on the schema before any
//! row is read). Every error names the file and, where it applies, the JSONL line (1-based), the
//! JSON array element (0-based) or the parquet row group and row (0-based).
//!
//! A zero-byte file is [`Error::EmptyFile`]. A well-formed file with no record (a JSONL file of blank
//! lines, `[]`, a parquet file with zero rows) yields nothing; [`read_records`] then fails with
//! [`Error::NoRecords`] only when *all* inputs together are empty.

mod json;
mod jsonl;
mod parquet;

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Location, Result};
use crate::record::{ColumnNames, Record};

use self::json::read_json_array;
use self::jsonl::JsonlRecords;
use self::parquet::ParquetRecords;

/// The on-disk format of an instruction file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Apache Parquet (`.parquet`).
    Parquet,
    /// One JSON object per line (`.jsonl`, also `.ndjson`).
    Jsonl,
    /// One JSON array of objects (`.json`).
    Json,
}

impl DataFormat {
    /// Infers the format from a file extension (case-insensitive), `None` if unknown.
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "parquet" | "pq" => Some(DataFormat::Parquet),
            "jsonl" | "ndjson" => Some(DataFormat::Jsonl),
            "json" => Some(DataFormat::Json),
            _ => None,
        }
    }
}

/// How records are read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReaderConfig {
    /// The format of every input; `None` (default) infers it per file from the extension.
    pub format: Option<DataFormat>,
    /// Field / column names.
    pub columns: ColumnNames,
    /// Rows per arrow batch when decoding parquet (default 1024).
    pub parquet_batch_rows: usize,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        ReaderConfig {
            format: None,
            columns: ColumnNames::default(),
            parquet_batch_rows: 1024,
        }
    }
}

impl ReaderConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        self.columns.validate()?;
        if self.parquet_batch_rows == 0 {
            return Err(Error::InvalidConfig(
                "parquet_batch_rows must be > 0".into(),
            ));
        }
        Ok(())
    }
}

/// Expands the inputs: a directory becomes its files with a supported extension (not recursive,
/// sorted by name); a file is kept as is (its extension is checked later, unless the format is
/// forced).
pub fn expand_inputs<P: AsRef<Path>>(inputs: &[P]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        let p = p.as_ref();
        let meta = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
        if meta.is_dir() {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(p).map_err(|e| Error::io(p, e))? {
                let entry = entry.map_err(|e| Error::io(p, e))?;
                let path = entry.path();
                if path.is_file() && DataFormat::from_path(&path).is_some() {
                    files.push(path);
                }
            }
            if files.is_empty() {
                return Err(Error::EmptyDirectory { path: p.into() });
            }
            files.sort();
            out.extend(files);
        } else {
            out.push(p.to_path_buf());
        }
    }
    Ok(out)
}

/// Reads every record of every input (files or directories), in order.
///
/// Fails with [`Error::NoRecords`] if the inputs hold no record at all.
pub fn read_records<P: AsRef<Path>>(inputs: &[P], config: &ReaderConfig) -> Result<Vec<Record>> {
    config.validate()?;
    let files = expand_inputs(inputs)?;
    let mut out = Vec::new();
    for f in &files {
        for r in Records::open(f, config)? {
            out.push(r?);
        }
    }
    if out.is_empty() {
        return Err(Error::NoRecords { paths: files });
    }
    Ok(out)
}

/// A streaming iterator over the records of one file.
///
/// After the first error it yields nothing more.
pub struct Records {
    inner: Inner,
    done: bool,
}

enum Inner {
    Jsonl(JsonlRecords),
    Json(std::vec::IntoIter<Result<Record>>),
    Parquet(Box<ParquetRecords>),
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.inner {
            Inner::Jsonl(j) => format!("Jsonl({})", j.path.display()),
            Inner::Json(_) => "Json".to_string(),
            Inner::Parquet(p) => format!("Parquet({})", p.path.display()),
        };
        f.debug_struct("Records")
            .field("inner", &kind)
            .field("done", &self.done)
            .finish()
    }
}

impl Records {
    /// Opens one file. The format comes from `config.format` or else from the extension.
    ///
    /// A zero-byte file is [`Error::EmptyFile`]. Parquet schemas are checked here (missing column,
    /// non-string column), before any row is read. A JSON array file is parsed completely here.
    pub fn open(path: impl AsRef<Path>, config: &ReaderConfig) -> Result<Self> {
        let path = path.as_ref();
        let format = match config.format {
            Some(f) => f,
            None => DataFormat::from_path(path).ok_or_else(|| Error::UnknownFormat {
                path: path.to_path_buf(),
            })?,
        };
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(Error::EmptyFile { path: path.into() });
        }
        let inner = match format {
            DataFormat::Jsonl => Inner::Jsonl(JsonlRecords::new(path, file, &config.columns)),
            DataFormat::Json => {
                Inner::Json(read_json_array(path, file, &config.columns)?.into_iter())
            }
            DataFormat::Parquet => Inner::Parquet(Box::new(ParquetRecords::open(
                path,
                file,
                &config.columns,
                config.parquet_batch_rows.max(1),
            )?)),
        };
        Ok(Records { inner, done: false })
    }

    /// The number of records, if known without reading the rows (parquet metadata, JSON array).
    pub fn len_hint(&self) -> Option<usize> {
        match &self.inner {
            Inner::Jsonl(_) => None,
            Inner::Json(it) => Some(it.len()),
            Inner::Parquet(p) => Some(p.total_rows),
        }
    }
}

impl Iterator for Records {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = match &mut self.inner {
            Inner::Jsonl(j) => j.next(),
            Inner::Json(it) => it.next(),
            Inner::Parquet(p) => p.next(),
        };
        match &item {
            None | Some(Err(_)) => self.done = true,
            Some(Ok(_)) => {}
        }
        item
    }
}

// ---------------------------------------------------------------------------------------------
// JSON values (shared by JSONL and JSON-array files)

fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn record_from_value(
    value: Value,
    columns: &ColumnNames,
    path: &Path,
    location: Location,
) -> Result<Record> {
    let mut obj = match value {
        Value::Object(m) => m,
        other => {
            return Err(Error::FieldType {
                path: path.into(),
                location,
                field: "<record>".into(),
                expected: "a JSON object",
                found: json_type_name(&other).into(),
            })
        }
    };
    let mut take = |field: &str, required: bool| -> Result<Option<String>> {
        match obj.remove(field) {
            None if required => Err(Error::MissingField {
                path: path.into(),
                location,
                field: field.into(),
            }),
            Some(Value::Null) if required => Err(Error::FieldType {
                path: path.into(),
                location,
                field: field.into(),
                expected: "string",
                found: "null".into(),
            }),
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(Error::FieldType {
                path: path.into(),
                location,
                field: field.into(),
                expected: "string",
                found: json_type_name(&other).into(),
            }),
        }
    };
    let instruction = take(&columns.instruction, true)?.unwrap_or_default();
    let output = take(&columns.output, true)?.unwrap_or_default();
    let input = match &columns.input {
        Some(name) => take(name, false)?,
        None => None,
    };
    Ok(Record {
        instruction,
        input,
        output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    pub(super) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        let mut f = File::create(&p).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        p
    }

    #[test]
    fn format_from_extension() {
        assert_eq!(
            DataFormat::from_path(Path::new("a/b.PARQUET")),
            Some(DataFormat::Parquet)
        );
        assert_eq!(
            DataFormat::from_path(Path::new("b.jsonl")),
            Some(DataFormat::Jsonl)
        );
        assert_eq!(
            DataFormat::from_path(Path::new("b.json")),
            Some(DataFormat::Json)
        );
        assert_eq!(DataFormat::from_path(Path::new("b.csv")), None);
        assert_eq!(DataFormat::from_path(Path::new("noext")), None);
    }

    #[test]
    fn custom_column_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.json",
            "[{\"q\":\"i\",\"a\":\"o\",\"ctx\":\"c\"}]",
        );
        let cfg = ReaderConfig {
            columns: ColumnNames {
                instruction: "q".into(),
                input: Some("ctx".into()),
                output: "a".into(),
            },
            ..Default::default()
        };
        assert_eq!(
            read_records(&[&p], &cfg).unwrap(),
            vec![Record::new("i", "o").with_input("c")]
        );
        // Forced format ignores the extension.
        let p2 = write(dir.path(), "a.txt", "{\"q\":\"i\",\"a\":\"o\"}\n");
        let cfg2 = ReaderConfig {
            format: Some(DataFormat::Jsonl),
            ..cfg
        };
        assert_eq!(
            read_records(&[&p2], &cfg2).unwrap(),
            vec![Record::new("i", "o")]
        );
        assert!(matches!(
            read_records(&[&p2], &ReaderConfig::default()),
            Err(Error::UnknownFormat { .. })
        ));
    }

    #[test]
    fn empty_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "empty.jsonl", "");
        assert!(matches!(
            Records::open(&p, &ReaderConfig::default()),
            Err(Error::EmptyFile { .. })
        ));
        let p = write(dir.path(), "blank.jsonl", "\n\n");
        assert!(matches!(
            read_records(&[&p], &ReaderConfig::default()),
            Err(Error::NoRecords { .. })
        ));
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        write(&sub, "notes.txt", "x");
        assert!(matches!(
            expand_inputs(&[&sub]),
            Err(Error::EmptyDirectory { .. })
        ));
    }
}
