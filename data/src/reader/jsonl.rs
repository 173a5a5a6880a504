//! JSONL (`.jsonl`, `.ndjson`): one JSON object per line, read line by line.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::record_from_value;
use crate::error::{Error, Location, Result};
use crate::record::{ColumnNames, Record};

pub(super) struct JsonlRecords {
    pub(super) path: PathBuf,
    reader: BufReader<File>,
    columns: ColumnNames,
    line_no: usize,
    buf: String,
}

impl JsonlRecords {
    pub(super) fn new(path: &Path, file: File, columns: &ColumnNames) -> Self {
        JsonlRecords {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 16, file),
            columns: columns.clone(),
            line_no: 0,
            buf: String::new(),
        }
    }

    pub(super) fn next(&mut self) -> Option<Result<Record>> {
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

#[cfg(test)]
mod tests {
    use crate::error::{Error, Location};
    use crate::reader::tests::write;
    use crate::reader::{read_records, ReaderConfig};
    use crate::record::Record;

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
}
