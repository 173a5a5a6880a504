//! Raw instruction records and the column names they are read from.

use serde::{Deserialize, Serialize};

/// One instruction-tuning record, as read from a file (Open-Platypus / Alpaca layout).
///
/// Only `instruction`, `input` and `output` are kept; every other field or column (e.g.
/// Open-Platypus's `data_source`) is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Record {
    /// The instruction (required).
    pub instruction: String,
    /// The optional extra input. The reference script ignores it; see
    /// [`InputPolicy`](crate::InputPolicy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// The expected answer (required).
    pub output: String,
}

impl Record {
    /// A record with no `input`.
    pub fn new(instruction: impl Into<String>, output: impl Into<String>) -> Self {
        Record {
            instruction: instruction.into(),
            input: None,
            output: output.into(),
        }
    }

    /// Sets the `input` field.
    #[must_use]
    pub fn with_input(mut self, input: impl Into<String>) -> Self {
        self.input = Some(input.into());
        self
    }
}

/// The field (JSON) or column (parquet) names records are read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ColumnNames {
    /// The instruction field, required (default `instruction`).
    pub instruction: String,
    /// The optional input field (default `input`); `None` to never read it. A missing or null
    /// value is `Record::input == None`.
    pub input: Option<String>,
    /// The answer field, required (default `output`).
    pub output: String,
}

impl Default for ColumnNames {
    fn default() -> Self {
        ColumnNames {
            instruction: "instruction".into(),
            input: Some("input".into()),
            output: "output".into(),
        }
    }
}

impl ColumnNames {
    /// Checks that names are non-empty and distinct.
    pub fn validate(&self) -> crate::Result<()> {
        let mut names = vec![&self.instruction, &self.output];
        if let Some(i) = &self.input {
            names.push(i);
        }
        if names.iter().any(|n| n.is_empty()) {
            return Err(crate::Error::InvalidConfig(
                "column names must not be empty".into(),
            ));
        }
        for (i, a) in names.iter().enumerate() {
            if names[i + 1..].contains(a) {
                return Err(crate::Error::InvalidConfig(format!(
                    "column name `{a}` is used for two fields"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_names_validate() {
        assert!(ColumnNames::default().validate().is_ok());
        let dup = ColumnNames {
            output: "instruction".into(),
            ..Default::default()
        };
        assert!(dup.validate().is_err());
        let empty = ColumnNames {
            instruction: String::new(),
            ..Default::default()
        };
        assert!(empty.validate().is_err());
    }
}
