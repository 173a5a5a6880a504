//! The main entry point: files → tokenized, masked examples (+ summary) → loader.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::example::{build_examples_inner, progress_bar, Example, PreprocessConfig, Summary};
use crate::loader::{Loader, LoaderConfig};
use crate::reader::{expand_inputs, ReaderConfig, Records};
use crate::record::Record;
use crate::tokenizer::TextTokenizer;

/// Reading plus preprocessing options.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DataConfig {
    /// How files are read.
    pub reader: ReaderConfig,
    /// How records become examples.
    pub preprocess: PreprocessConfig,
}

impl DataConfig {
    /// Checks both parts.
    pub fn validate(&self) -> Result<()> {
        self.reader.validate()?;
        self.preprocess.validate()
    }
}

/// Tokenized, label-masked examples ready for a [`Loader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstructionDataset {
    /// The kept examples, in file order.
    pub examples: Vec<Example>,
    /// What happened while building them.
    pub summary: Summary,
    /// The tokenizer's pad id (for [`InstructionDataset::loader`]).
    pub pad_id: u32,
}

/// Records are tokenized in chunks of this many, so that only one chunk of raw text is held in
/// memory at a time.
const CHUNK_RECORDS: usize = 8192;

impl InstructionDataset {
    /// Reads every input (files, or directories of `.parquet`/`.jsonl`/`.json` files), applies
    /// the template, tokenizes (in parallel) and masks, exactly as DeepSeek-MoE `finetune.py`.
    ///
    /// Fails with [`Error::NoRecords`] when the inputs hold no record. A dataset in which every
    /// record was dropped is returned as is (empty `examples`, counts in `summary`);
    /// [`InstructionDataset::loader`] then fails with [`Error::EmptyDataset`].
    pub fn load<P: AsRef<Path>>(
        inputs: &[P],
        tokenizer: &TextTokenizer,
        config: &DataConfig,
    ) -> Result<Self> {
        config.validate()?;
        config.preprocess.effective_max_len(tokenizer)?;
        let files = expand_inputs(inputs)?;
        let readers = files
            .iter()
            .map(|f| Records::open(f, &config.reader))
            .collect::<Result<Vec<_>>>()?;
        let total = readers.iter().map(Records::len_hint).sum::<Option<usize>>();
        let pb = progress_bar(config.preprocess.progress, total);
        let result = Self::load_inner(readers, tokenizer, config, &pb, &files);
        pb.finish_and_clear();
        result
    }

    fn load_inner(
        readers: Vec<Records>,
        tokenizer: &TextTokenizer,
        config: &DataConfig,
        pb: &indicatif::ProgressBar,
        files: &[PathBuf],
    ) -> Result<Self> {
        let mut examples = Vec::new();
        let mut summary = Summary::default();
        let mut chunk: Vec<Record> = Vec::with_capacity(CHUNK_RECORDS);
        let mut flush = |chunk: &mut Vec<Record>, summary: &mut Summary| -> Result<()> {
            let (ex, s) =
                build_examples_inner(chunk, summary.records, tokenizer, &config.preprocess, pb)?;
            examples.extend(ex);
            summary.merge(&s);
            chunk.clear();
            Ok(())
        };
        for reader in readers {
            for record in reader {
                chunk.push(record?);
                if chunk.len() == CHUNK_RECORDS {
                    flush(&mut chunk, &mut summary)?;
                }
            }
        }
        if !chunk.is_empty() {
            flush(&mut chunk, &mut summary)?;
        }
        if summary.records == 0 {
            return Err(Error::NoRecords {
                paths: files.to_vec(),
            });
        }
        Ok(InstructionDataset {
            examples,
            summary,
            pad_id: tokenizer.pad_id(),
        })
    }

    /// Preprocesses records already in memory.
    pub fn from_records(
        records: &[Record],
        tokenizer: &TextTokenizer,
        config: &PreprocessConfig,
    ) -> Result<Self> {
        let (examples, summary) = crate::example::build_examples(records, tokenizer, config)?;
        Ok(InstructionDataset {
            examples,
            summary,
            pad_id: tokenizer.pad_id(),
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there is no example.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// A loader over these examples (they are moved into the loader; clone the dataset first to
    /// keep it).
    pub fn loader(self, config: LoaderConfig) -> Result<Loader> {
        Loader::new(self.examples, self.pad_id, config)
    }
}
