//! JSON (`.json`): one top-level array of objects, parsed completely when the file is opened;
//! or, as `datasets.load_dataset("json")` also accepts, JSON Lines under a `.json` name (one
//! object per line), recognised by a first character other than `[`.

use std::fs::File;
use std::path::Path;

use serde_json::Value;

use super::record_from_value;
use crate::error::{Error, Location, Result};
use crate::record::{ColumnNames, Record};

pub(super) fn read_json_array(
    path: &Path,
    mut file: File,
    columns: &ColumnNames,
) -> Result<Vec<Result<Record>>> {
    use std::io::Read;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    let body = text.strip_prefix('\u{feff}').unwrap_or(&text);
    if !body.trim_start().starts_with('[') {
        return Ok(json_lines(path, body, columns));
    }
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

/// The records of JSON Lines text, one per non-blank line (stopping after the first error).
fn json_lines(path: &Path, body: &str, columns: &ColumnNames) -> Vec<Result<Record>> {
    let mut out = Vec::new();
    for (i, line) in body.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r = serde_json::from_str::<Value>(line)
            .map_err(|source| Error::Json {
                path: path.into(),
                location: Location::Line(i + 1),
                source,
            })
            .and_then(|v| record_from_value(v, columns, path, Location::Line(i + 1)));
        let is_err = r.is_err();
        out.push(r);
        if is_err {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::error::{Error, Location};
    use crate::reader::tests::write;
    use crate::reader::{read_records, ReaderConfig};

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
    fn json_lines_under_a_json_name_load() {
        // As datasets.load_dataset("json") reads them; errors still name the line.
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "lines.json",
            "{\"instruction\":\"a\",\"output\":\"b\"}\n\n{\"instruction\":\"c\",\"output\":\"d\"}\n",
        );
        let recs = read_records(&[&p], &ReaderConfig::default()).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(
            (recs[1].instruction.as_str(), recs[1].output.as_str()),
            ("c", "d")
        );
        let p = write(
            dir.path(),
            "bad.json",
            "{\"instruction\":\"a\",\"output\":\"b\"}\n{\"instruction\":\"c\"}\n",
        );
        match read_records(&[&p], &ReaderConfig::default()).unwrap_err() {
            Error::MissingField {
                location, field, ..
            } => {
                assert_eq!(location, Location::Line(2));
                assert_eq!(field, "output");
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn a_null_field_is_reported_as_null() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "n.json",
            "[{\"instruction\":\"i\",\"output\":null}]",
        );
        let e = read_records(&[&p], &ReaderConfig::default()).unwrap_err();
        assert!(
            matches!(&e, Error::FieldType { field, found, .. } if field == "output" && found == "null"),
            "{e}"
        );
    }
}
