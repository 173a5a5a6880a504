//! JSON (`.json`): one top-level array of objects, parsed completely when the file is opened.

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
}
