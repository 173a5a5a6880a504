//! Instruction data for LoRA/QLoRA fine-tuning of DeepSeekMoE: parquet / JSONL / JSON records →
//! prompt template → tokenized, label-masked examples → padded batches.
//!
//! The preprocessing is that of DeepSeek-MoE's
//! [`finetune/finetune.py`](https://github.com/deepseek-ai/DeepSeek-MoE/blob/main/finetune/finetune.py)
//! (itself derived from [artidoro/qlora](https://github.com/artidoro/qlora)):
//!
//! - **Template** ([`Template::Reference`]): `build_instruction_prompt(instruction)` (system prompt,
//!   `### Instruction:`, `instruction.strip()`, `### Response:`), target `f"{output}\n<|EOT|>"`.
//!   Only `instruction` and `output` are used; `input` is ignored unless [`InputPolicy`] says
//!   otherwise.
//! - **Tokenization** ([`TextTokenizer`]): like transformers' `LlamaTokenizerFast` with
//!   `add_bos_token` (BOS 100000 prepended), right truncation at `model_max_length`
//!   ([`PreprocessConfig::max_len`], 512 by default as in `finetune.py`).
//! - **Masking** ([`build_example`]): the ids are those of source+target, and
//!   `labels = input_ids` with the first `len(source_ids)` (BOS included) set to `-100`, as the
//!   reference computes them by tokenizing the source and source+target separately. Where line
//!   breaks are token boundaries ([`TextTokenizer::splits_at_line_breaks`], DeepSeek's tokenizer)
//!   and the source ends with one, each text is tokenized once instead, with the same ids.
//!   Examples left without a target token are counted and dropped ([`Summary`]).
//! - **Batching** ([`collate`], [`Loader`]): right padding with the pad id (EOS 100001), labels
//!   `-100`, attention mask 1/0; seeded, resumable shuffling ([`LoaderState`]), optional
//!   length grouping (HF `group_by_length`) and token-budget batches.
//!
//! `<|EOT|>` is **not** a token of the DeepSeekMoE vocabulary (which has only two added tokens,
//! BOS 100000 and EOS 100001): it encodes as plain text, five BPE pieces `<` `|` `E` `OT` `|>`
//! (ids 27, 91, 36, 2787, 66325), exactly as in the reference run, so the model learns to emit
//! those five tokens after each answer (see the `tokenizer` integration test).
//!
//! The crate does not depend on candle; [`Batch`] holds plain row-major vectors.
//!
//! Where things live: `reader/` (one file per input format: parquet, JSONL, JSON), `template`,
//! `tokenizer`, `example` (masking), `dataset`, `loader` (shuffling, grouping, packing),
//! `batch` (collation), `writer` (writing data files) and [`synthetic`] (generated data).
//!
//! # Example
//!
//! ```
//! use moe_peft_data::{DataConfig, InstructionDataset, LoaderConfig, TextTokenizer};
//!
//! let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures");
//! let tokenizer = TextTokenizer::from_dir(format!("{root}/tokenizer"))?;
//! let data = InstructionDataset::load(
//!     &[format!("{root}/data/tiny_instruct.jsonl")],
//!     &tokenizer,
//!     &DataConfig::default(),
//! )?;
//! println!("{}", data.summary);
//! assert_eq!(data.summary.records, 256);
//!
//! let mut loader = data.loader(LoaderConfig::default().batch_size(8).seed(1))?;
//! let batch = loader.next_batch().expect("one batch");
//! assert_eq!(batch.input_ids.len(), batch.batch_size * batch.seq_len);
//! assert_eq!(batch.input_ids[0], 100000); // BOS
//! let state = loader.state(); // serde: store it with the checkpoint
//! # let _ = state;
//! # Ok::<(), moe_peft_data::Error>(())
//! ```
#![warn(missing_docs)]

mod batch;
mod dataset;
mod error;
mod example;
mod loader;
mod reader;
mod record;
mod rng;
pub mod synthetic;
mod template;
mod tokenizer;
mod writer;

pub use batch::{collate, collate_packed, padded_len, Batch};
pub use dataset::{DataConfig, InstructionDataset};
pub use error::{Error, Location, Result};
pub use example::{
    build_example, build_examples, DropReason, Example, PreprocessConfig, Processed, Summary,
    IGNORE_INDEX,
};
pub use loader::{Loader, LoaderConfig, LoaderState, PACK_WINDOW};
pub use reader::{expand_inputs, read_records, DataFormat, ReaderConfig, Records};
pub use record::{ColumnNames, Record};
pub use rng::SplitMix64;
pub use template::{
    is_py_space, py_strip, InputPolicy, Template, DEEPSEEK_EOS, REFERENCE_EOT,
    REFERENCE_SYSTEM_PROMPT,
};
pub use tokenizer::{TextTokenizer, TokenizerSettings};
pub use writer::{write_records_jsonl, write_records_parquet, StringType, WriteOptions};
