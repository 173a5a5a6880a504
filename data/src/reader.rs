//! Streaming readers for parquet, JSONL and JSON-array instruction files.
//!
//! - **Parquet** is read one row group at a time through parquet's arrow reader, projecting only
//!   the configured columns. String columns may be `Utf8`, `LargeUtf8`, `Utf8View` or a dictionary
//!   of `Utf8`/`LargeUtf8`. This is what `datasets`' `load_dataset('parquet', ...)` reads in the
//!   reference script (Open-Platypus on the Hub is parquet with columns `input`, `output`,
//!   `instruction`, `data_source`).
//! - **JSONL** is read line by line; blank lines are skipped; each line must be a JSON object.
//! - **JSON** is one top-level array of objects (the whole file is parsed at once).
//!
//! A required field that is absent or null is [`Error::MissingField`]; a field of the wrong type is
//! [`Error::FieldType`] (JSON) or [`Error::ColumnType`] (parquet, checked on the schema before any
//! row is read). Every error names the file and, where it applies, the JSONL line (1-based), the
//! JSON array element (0-based) or the parquet row group and row (0-based).
//!
//! A zero-byte file is [`Error::EmptyFile`]. A well-formed file with no record (a JSONL file of blank
//! lines, `[]`, a parquet file with zero rows) yields nothing; [`read_records`] then fails with
//! [`Error::NoRecords`] only when *all* inputs together are empty.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Location, Result};
use crate::record::{ColumnNames, Record};

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
            DataFormat::Jsonl => Inner::Jsonl(JsonlRecords {
                path: path.to_path_buf(),
                reader: BufReader::with_capacity(1 << 16, file),
                columns: config.columns.clone(),
                line_no: 0,
                buf: String::new(),
            }),
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
// JSON

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
            None | Some(Value::Null) if required => Err(Error::MissingField {
                path: path.into(),
                location,
                field: field.into(),
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

struct JsonlRecords {
    path: PathBuf,
    reader: BufReader<File>,
    columns: ColumnNames,
    line_no: usize,
    buf: String,
}

impl JsonlRecords {
    fn next(&mut self) -> Option<Result<Record>> {
        loop {
            self.buf.clear();
            self.line_no += 1;
            match self.reader.read_line(&mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    return Some(Err(Error::Io {
                        path: self.path.clone(),
                        source: std::io::Error::new(
                            e.kind(),
                            format!("line {}: {e}", self.line_no),
                        ),
                    }))
                }
            }
            let mut line = self.buf.as_str();
            if self.line_no == 1 {
                line = line.strip_prefix('\u{feff}').unwrap_or(line);
            }
            if line.trim().is_empty() {
                continue;
            }
            let location = Location::Line(self.line_no);
            let value: Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(source) => {
                    return Some(Err(Error::Json {
                        path: self.path.clone(),
                        location,
                        source,
                    }))
                }
            };
            return Some(record_from_value(
                value,
                &self.columns,
                &self.path,
                location,
            ));
        }
    }
}

fn read_json_array(
    path: &Path,
    mut file: File,
    columns: &ColumnNames,
) -> Result<Vec<Result<Record>>> {
    use std::io::Read;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    let body = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let values: Vec<Value> = serde_json::from_str(body).map_err(|source| Error::Json {
        path: path.into(),
        location: Location::Line(source.line()),
        source,
    })?;
    // Convert eagerly but keep per-element results so the iterator reports the first error in order.
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.into_iter().enumerate() {
        let r = record_from_value(v, columns, path, Location::Element(i));
        let is_err = r.is_err();
        out.push(r);
        if is_err {
            break;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Parquet

const STRING_TYPES: &str = "a string column (Utf8, LargeUtf8, Utf8View or a dictionary of Utf8)";

fn is_string_type(dt: &DataType) -> bool {
    match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, v) => matches!(v.as_ref(), DataType::Utf8 | DataType::LargeUtf8),
        _ => false,
    }
}

/// A string column of one batch, viewed without copying.
enum StrCol<'a> {
    Utf8(&'a arrow::array::StringArray),
    Large(&'a arrow::array::LargeStringArray),
    View(&'a arrow::array::StringViewArray),
}

impl StrCol<'_> {
    fn get(&self, i: usize) -> Option<&str> {
        match self {
            StrCol::Utf8(a) => (!a.is_null(i)).then(|| a.value(i)),
            StrCol::Large(a) => (!a.is_null(i)).then(|| a.value(i)),
            StrCol::View(a) => (!a.is_null(i)).then(|| a.value(i)),
        }
    }
}

struct ParquetRecords {
    path: PathBuf,
    file: File,
    metadata: ArrowReaderMetadata,
    mask: ProjectionMask,
    columns: ColumnNames,
    read_input: bool,
    batch_rows: usize,
    total_rows: usize,
    n_row_groups: usize,
    next_row_group: usize,
    current: Option<ParquetRecordBatchReader>,
    row_group: usize,
    row_in_group: usize,
    rows_before_group: usize,
    group_rows: usize,
    pending: VecDeque<Record>,
}

impl ParquetRecords {
    fn open(path: &Path, file: File, columns: &ColumnNames, batch_rows: usize) -> Result<Self> {
        let perr = |source| Error::Parquet {
            path: path.into(),
            source,
        };
        let metadata = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(perr)?;
        let schema = metadata.schema().clone();
        let available: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let mut roots = Vec::new();
        let mut check = |name: &str, required: bool| -> Result<bool> {
            match schema.index_of(name) {
                Ok(idx) => {
                    let dt = schema.field(idx).data_type();
                    if !is_string_type(dt) {
                        return Err(Error::ColumnType {
                            path: path.into(),
                            column: name.into(),
                            expected: STRING_TYPES,
                            found: dt.to_string(),
                        });
                    }
                    roots.push(idx);
                    Ok(true)
                }
                Err(_) if required => Err(Error::MissingColumn {
                    path: path.into(),
                    column: name.into(),
                    available: available.clone(),
                }),
                Err(_) => Ok(false),
            }
        };
        check(&columns.instruction, true)?;
        check(&columns.output, true)?;
        let read_input = match &columns.input {
            Some(name) => check(name, false)?,
            None => false,
        };
        let mask = ProjectionMask::roots(metadata.metadata().file_metadata().schema_descr(), roots);
        let total_rows =
            usize::try_from(metadata.metadata().file_metadata().num_rows()).unwrap_or(0);
        let n_row_groups = metadata.metadata().num_row_groups();
        Ok(ParquetRecords {
            path: path.into(),
            file,
            metadata,
            mask,
            columns: columns.clone(),
            read_input,
            batch_rows,
            total_rows,
            n_row_groups,
            next_row_group: 0,
            current: None,
            row_group: 0,
            row_in_group: 0,
            rows_before_group: 0,
            group_rows: 0,
            pending: VecDeque::new(),
        })
    }

    fn open_next_group(&mut self) -> Result<bool> {
        if self.next_row_group >= self.n_row_groups {
            return Ok(false);
        }
        let rg = self.next_row_group;
        self.next_row_group += 1;
        self.rows_before_group += self.group_rows;
        self.group_rows =
            usize::try_from(self.metadata.metadata().row_group(rg).num_rows()).unwrap_or(0);
        self.row_group = rg;
        self.row_in_group = 0;
        let file = self
            .file
            .try_clone()
            .map_err(|e| Error::io(&self.path, e))?;
        let reader =
            ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.metadata.clone())
                .with_row_groups(vec![rg])
                .with_projection(self.mask.clone())
                .with_batch_size(self.batch_rows)
                .build()
                .map_err(|source| Error::Parquet {
                    path: self.path.clone(),
                    source,
                })?;
        self.current = Some(reader);
        Ok(true)
    }

    fn column<'a>(
        &self,
        batch: &'a RecordBatch,
        name: &str,
        casted: &'a mut Option<ArrayRef>,
    ) -> Result<Option<StrCol<'a>>> {
        let Some(col) = batch.column_by_name(name) else {
            return Ok(None);
        };
        let arr: &'a ArrayRef = if matches!(col.data_type(), DataType::Dictionary(_, _)) {
            let c = arrow::compute::cast(col, &DataType::Utf8).map_err(|source| Error::Arrow {
                path: self.path.clone(),
                source,
            })?;
            &*casted.insert(c)
        } else {
            col
        };
        let typed = match arr.data_type() {
            DataType::Utf8 => StrCol::Utf8(arr.as_string::<i32>()),
            DataType::LargeUtf8 => StrCol::Large(arr.as_string::<i64>()),
            DataType::Utf8View => StrCol::View(arr.as_string_view()),
            other => {
                return Err(Error::ColumnType {
                    path: self.path.clone(),
                    column: name.into(),
                    expected: STRING_TYPES,
                    found: other.to_string(),
                })
            }
        };
        Ok(Some(typed))
    }

    fn decode_batch(&mut self, batch: &RecordBatch) -> Result<()> {
        let (mut c1, mut c2, mut c3) = (None, None, None);
        let missing = |name: &str| Error::MissingColumn {
            path: self.path.clone(),
            column: name.into(),
            available: batch
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect(),
        };
        let ins = self
            .column(batch, &self.columns.instruction, &mut c1)?
            .ok_or_else(|| missing(&self.columns.instruction))?;
        let out = self
            .column(batch, &self.columns.output, &mut c2)?
            .ok_or_else(|| missing(&self.columns.output))?;
        let inp = match (&self.columns.input, self.read_input) {
            (Some(name), true) => self.column(batch, name, &mut c3)?,
            _ => None,
        };
        let mut records = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let location = Location::Row {
                row_group: self.row_group,
                row: self.row_in_group + i,
                file_row: self.rows_before_group + self.row_in_group + i,
            };
            let need = |v: Option<&str>, field: &str| {
                v.map(str::to_owned).ok_or_else(|| Error::MissingField {
                    path: self.path.clone(),
                    location,
                    field: field.into(),
                })
            };
            let instruction = need(ins.get(i), &self.columns.instruction)?;
            let output = need(out.get(i), &self.columns.output)?;
            let input = inp.as_ref().and_then(|c| c.get(i)).map(str::to_owned);
            records.push(Record {
                instruction,
                input,
                output,
            });
        }
        self.row_in_group += batch.num_rows();
        self.pending.extend(records);
        Ok(())
    }

    fn next(&mut self) -> Option<Result<Record>> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Some(Ok(r));
            }
            let next_batch = self.current.as_mut().and_then(|r| r.next());
            match next_batch {
                Some(Ok(batch)) => {
                    if let Err(e) = self.decode_batch(&batch) {
                        return Some(Err(e));
                    }
                }
                Some(Err(source)) => {
                    return Some(Err(Error::Arrow {
                        path: self.path.clone(),
                        source,
                    }))
                }
                None => match self.open_next_group() {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(e) => return Some(Err(e)),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
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
    fn jsonl_skips_blank_lines_and_keeps_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.jsonl",
            "\u{feff}{\"instruction\":\"i1\",\"output\":\"o1\",\"data_source\":\"x\"}\n\n   \n{\"instruction\":\"i2\",\"input\":\"in\",\"output\":\"o2\"}\r\n{\"instruction\":\"i3\",\"input\":null,\"output\":\"o3\"}",
        );
        let recs = read_records(&[&p], &ReaderConfig::default()).unwrap();
        assert_eq!(
            recs,
            vec![
                Record::new("i1", "o1"),
                Record::new("i2", "o2").with_input("in"),
                Record::new("i3", "o3"),
            ]
        );
    }

    #[test]
    fn jsonl_errors_name_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.jsonl",
            "{\"instruction\":\"i\",\"output\":\"o\"}\n\n{\"instruction\":5,\"output\":\"o\"}\n",
        );
        let e = read_records(&[&p], &ReaderConfig::default()).unwrap_err();
        match e {
            Error::FieldType {
                location,
                field,
                found,
                ..
            } => {
                assert_eq!(location, Location::Line(3));
                assert_eq!(field, "instruction");
                assert_eq!(found, "number");
            }
            other => panic!("unexpected {other}"),
        }
        let p = write(dir.path(), "b.jsonl", "[1,2]\n");
        assert!(matches!(
            read_records(&[&p], &ReaderConfig::default()),
            Err(Error::FieldType {
                location: Location::Line(1),
                ..
            })
        ));
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
    fn json_array_element_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.json",
            "[{\"instruction\":\"i\",\"output\":\"o\"},{\"instruction\":\"i\"}]",
        );
        match read_records(&[&p], &ReaderConfig::default()).unwrap_err() {
            Error::MissingField {
                location, field, ..
            } => {
                assert_eq!(location, Location::Element(1));
                assert_eq!(field, "output");
            }
            other => panic!("unexpected {other}"),
        }
        let p = write(
            dir.path(),
            "b.json",
            "[{\"instruction\":\"i\",\n\"output\":}]",
        );
        assert!(matches!(
            read_records(&[&p], &ReaderConfig::default()),
            Err(Error::Json {
                location: Location::Line(2),
                ..
            })
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
