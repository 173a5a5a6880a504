//! Parquet (`.parquet`, `.pq`): read one row group at a time through parquet's arrow reader,
//! projecting only the configured string columns.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;

use crate::error::{Error, Location, Result};
use crate::record::{ColumnNames, Record};

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

pub(super) struct ParquetRecords {
    pub(super) path: PathBuf,
    file: File,
    metadata: ArrowReaderMetadata,
    mask: ProjectionMask,
    columns: ColumnNames,
    read_input: bool,
    batch_rows: usize,
    pub(super) total_rows: usize,
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
    pub(super) fn open(
        path: &Path,
        file: File,
        columns: &ColumnNames,
        batch_rows: usize,
    ) -> Result<Self> {
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

    pub(super) fn next(&mut self) -> Option<Result<Record>> {
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
