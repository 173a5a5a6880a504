//! The crate's error type.

use std::fmt;
use std::path::PathBuf;

/// Where in a file a record came from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// A JSONL line, 1-based (as editors count).
    Line(usize),
    /// An element of a top-level JSON array, 0-based.
    Element(usize),
    /// A parquet row: row group (0-based), row inside that group (0-based) and row in the file (0-based).
    Row {
        /// Row group index.
        row_group: usize,
        /// Row index inside the row group.
        row: usize,
        /// Row index in the whole file.
        file_row: usize,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(l) => write!(f, "line {l}"),
            Location::Element(i) => write!(f, "array element {i}"),
            Location::Row {
                row_group,
                row,
                file_row,
            } => write!(f, "row group {row_group}, row {row} (file row {file_row})"),
        }
    }
}

/// Errors of the `moe-peft-data` crate.
///
/// Every variant that comes from reading a file names the file; record-level variants also carry a
/// [`Location`] (JSONL line, JSON array element, or parquet row group and row).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file or directory.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON syntax error (a malformed JSONL line, or a malformed JSON array file).
    #[error("{path}: {location}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The line (JSONL) or, for a JSON array file, the line reported by the parser.
        location: Location,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A required field is missing or null (`instruction` or `output`, or their configured names).
    #[error("{path}: {location}: missing required field `{field}`")]
    MissingField {
        /// The file.
        path: PathBuf,
        /// Where the record is.
        location: Location,
        /// The field or column name.
        field: String,
    },
    /// A JSON field has the wrong type (e.g. a number where a string is expected).
    #[error("{path}: {location}: field `{field}` has type {found}, expected {expected}")]
    FieldType {
        /// The file.
        path: PathBuf,
        /// Where the record is.
        location: Location,
        /// The field name.
        field: String,
        /// What was expected.
        expected: &'static str,
        /// What was found.
        found: String,
    },
    /// A required parquet column is absent from the file's schema.
    #[error("{path}: missing required column `{column}` (columns: {available:?})")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The column name.
        column: String,
        /// The top-level columns the file has.
        available: Vec<String>,
    },
    /// A parquet column has a type other than a string type.
    #[error("{path}: column `{column}` has type {found}, expected {expected}")]
    ColumnType {
        /// The file.
        path: PathBuf,
        /// The column name.
        column: String,
        /// What was expected.
        expected: &'static str,
        /// The arrow data type found.
        found: String,
    },
    /// The parquet decoder failed.
    #[error("{path}: parquet: {source}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The parquet error.
        source: parquet::errors::ParquetError,
    },
    /// An arrow error while decoding or casting a parquet batch.
    #[error("{path}: arrow: {source}")]
    Arrow {
        /// The file.
        path: PathBuf,
        /// The arrow error.
        source: arrow::error::ArrowError,
    },
    /// A zero-byte input file. A zero-byte file is almost always a failed download or copy, so it
    /// is an error rather than an empty dataset.
    #[error("{path}: file is empty (0 bytes)")]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },
    /// All inputs together held no record at all.
    #[error("no records in {paths:?}")]
    NoRecords {
        /// The inputs that were read.
        paths: Vec<PathBuf>,
    },
    /// No example survived preprocessing (all were dropped), so there is nothing to batch.
    #[error("no examples to batch (every record was dropped or the dataset is empty)")]
    EmptyDataset,
    /// The format could not be inferred from the file name.
    #[error("{path}: cannot infer the data format from the extension (expected .parquet, .jsonl or .json)")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// A directory input held no file with a supported extension.
    #[error("{path}: directory holds no .parquet, .jsonl or .json file")]
    EmptyDirectory {
        /// The directory.
        path: PathBuf,
    },
    /// The `tokenizers` library failed (loading or encoding).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A special token named in `tokenizer_config.json` (or set by hand) is not in the vocabulary.
    #[error("special token `{token}` ({role}) is not in the tokenizer's vocabulary")]
    UnknownToken {
        /// Which special token (`bos`, `eos`, `pad`).
        role: &'static str,
        /// Its text.
        token: String,
    },
    /// Neither a pad token nor an eos token is known, so batches cannot be padded.
    #[error("the tokenizer has neither a pad token nor an eos token to pad with")]
    NoPadToken,
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An example is longer than the loader's token budget, so no batch could hold it.
    #[error("example {index} has {len} tokens (padded), more than the token budget {budget}")]
    ExampleExceedsBudget {
        /// Index of the example.
        index: usize,
        /// Its padded length.
        len: usize,
        /// The configured budget.
        budget: usize,
    },
    /// A saved [`LoaderState`](crate::LoaderState) does not belong to this dataset or configuration.
    #[error("loader state does not match this loader: {0}")]
    StateMismatch(String),
    /// A JSON (de)serialization error outside of record reading (e.g. `tokenizer_config.json`).
    #[error("{path}: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn tokenizer(e: impl fmt::Display) -> Self {
        Error::Tokenizer(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_file_and_location() {
        let e = Error::MissingField {
            path: "a/b.jsonl".into(),
            location: Location::Line(7),
            field: "output".into(),
        };
        assert_eq!(
            e.to_string(),
            "a/b.jsonl: line 7: missing required field `output`"
        );
        let e = Error::MissingField {
            path: "x.parquet".into(),
            location: Location::Row {
                row_group: 1,
                row: 2,
                file_row: 10,
            },
            field: "output".into(),
        };
        assert_eq!(
            e.to_string(),
            "x.parquet: row group 1, row 2 (file row 10): missing required field `output`"
        );
    }
}
