//! Tokenization and label masking, exactly as DeepSeek-MoE `finetune.py` `preprocess` does it.
//!
//! For each record, with `L = max_len`:
//! 1. render `source` and `target` with the [`Template`];
//! 2. `input_ids = tokenizer(source + target, max_length=L, truncation=True)` (BOS prepended,
//!    right truncation of the whole text);
//! 3. `source_len = len(tokenizer(source, max_length=L, truncation=True))` (BOS included);
//! 4. `labels = input_ids` with the first `source_len` positions set to `-100`.
//!
//! The source is tokenized on its own, as in the reference; the BPE merges across the
//! source/target boundary are not re-checked there. We count the examples where the full
//! encoding does not start with the source encoding in [`Summary::boundary_mismatches`] (zero
//! for the built-in templates on ordinary text, since the reference prompt ends in `\n`, which the
//! DeepSeek pre-tokenizer always isolates).
//!
//! An example whose labels are all `-100` has no loss term. It is counted and, by default,
//! dropped ([`PreprocessConfig::drop_fully_masked`]):
//! [`DropReason::PromptTooLong`] when the text was truncated and the prompt fills the whole
//! window (the reference's "prompt ≥ max_len" case), [`DropReason::NoTargetTokens`] otherwise.

use std::fmt;
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::record::Record;
use crate::template::{InputPolicy, Template};
use crate::tokenizer::TextTokenizer;

/// The label value that the loss ignores (PyTorch `CrossEntropyLoss` `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One tokenized, label-masked training example (not padded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// Token ids, BOS first.
    pub input_ids: Vec<u32>,
    /// `input_ids` as `i64`, with the prompt positions set to [`IGNORE_INDEX`].
    pub labels: Vec<i64>,
    /// 1 for every position (padding happens in [`collate`](crate::collate)).
    pub attention_mask: Vec<u8>,
}

impl Example {
    /// Builds an example from ids and the number of masked leading positions (clamped to the
    /// length).
    pub fn new(input_ids: Vec<u32>, n_masked: usize) -> Self {
        let n_masked = n_masked.min(input_ids.len());
        let labels = input_ids
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if i < n_masked {
                    IGNORE_INDEX
                } else {
                    i64::from(t)
                }
            })
            .collect();
        let attention_mask = vec![1; input_ids.len()];
        Example {
            input_ids,
            labels,
            attention_mask,
        }
    }

    /// Sequence length.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the example has no token.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of positions whose label is not [`IGNORE_INDEX`].
    pub fn n_target_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Why an example was dropped (or would be, see [`PreprocessConfig::drop_fully_masked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The text was truncated and the prompt (BOS included) alone fills `max_len`, so no target
    /// token is left.
    PromptTooLong,
    /// The target added no token to the prompt's encoding (e.g. an empty custom target).
    NoTargetTokens,
}

/// Preprocessing options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreprocessConfig {
    /// The prompt template (default: the reference's).
    pub template: Template,
    /// What to do with the `input` field (default: ignore it, as the reference does).
    pub input_policy: InputPolicy,
    /// Maximum sequence length in tokens, BOS included (the reference's `model_max_length`:
    /// `finetune.py` defaults to 512, its README uses 1024). `None` takes the tokenizer's
    /// `model_max_length` (16384 for DeepSeek).
    pub max_len: Option<usize>,
    /// Drop examples whose labels are all `-100` (default `true`); they are counted either way.
    /// The reference keeps them (they add no loss term, but a batch made only of them has an
    /// undefined mean loss); set `false` to match it exactly.
    pub drop_fully_masked: bool,
    /// Show a progress bar (only when stderr is a terminal and there are at least
    /// [`PreprocessConfig::PROGRESS_MIN_RECORDS`] records).
    pub progress: bool,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        PreprocessConfig {
            template: Template::Reference,
            input_policy: InputPolicy::Ignore,
            max_len: Some(512),
            drop_fully_masked: true,
            progress: true,
        }
    }
}

impl PreprocessConfig {
    /// Below this many records no progress bar is drawn.
    pub const PROGRESS_MIN_RECORDS: usize = 2000;

    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        self.template.validate()?;
        if let Some(l) = self.max_len {
            if l < 2 {
                return Err(Error::InvalidConfig(format!(
                    "max_len must be at least 2, got {l}"
                )));
            }
        }
        Ok(())
    }

    /// The effective maximum length for a tokenizer.
    pub fn effective_max_len(&self, tokenizer: &TextTokenizer) -> Result<usize> {
        self.max_len
            .or(tokenizer.model_max_length())
            .ok_or_else(|| {
                Error::InvalidConfig(
                    "max_len is unset and the tokenizer has no model_max_length".into(),
                )
            })
    }
}

/// The result of preprocessing one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    /// The example (always built, even when it would be dropped).
    pub example: Example,
    /// Number of masked leading positions (`source_len`, clamped to the length).
    pub source_len: usize,
    /// The full text was longer than `max_len` and was cut.
    pub truncated: bool,
    /// The full encoding does not start with the separately tokenized source.
    pub boundary_mismatch: bool,
    /// `Some` when every label is `-100`.
    pub drop: Option<DropReason>,
}

/// Preprocesses one record (the reference's `preprocess` for a single example).
///
/// The reference tokenizes the source alone (its length is the number of masked positions) and
/// source + target. When the source ends with a line break and the tokenizer treats line breaks
/// as token boundaries ([`TextTokenizer::splits_at_line_breaks`], true for DeepSeek's), the full
/// encoding is exactly the source's followed by the target's, so each text is tokenized once;
/// otherwise both are tokenized as the reference does. The ids are the same either way.
pub fn build_example(
    record: &Record,
    tokenizer: &TextTokenizer,
    template: &Template,
    input_policy: InputPolicy,
    max_len: usize,
) -> Result<Processed> {
    build_example_with(record, tokenizer, template, input_policy, max_len, None)
}

/// The encoding of a template's [constant prefix](Template::constant_prefix), made once per
/// dataset.
#[derive(Debug, Clone)]
pub(crate) struct PrefixIds {
    text: String,
    ids: Vec<u32>,
}

impl PrefixIds {
    /// `None` unless the tokenizer splits at line breaks and the template has a constant prefix.
    pub(crate) fn new(tokenizer: &TextTokenizer, template: &Template) -> Result<Option<Self>> {
        if !tokenizer.splits_at_line_breaks() {
            return Ok(None);
        }
        let Some(text) = template.constant_prefix() else {
            return Ok(None);
        };
        let ids = tokenizer.encode_raw(&text)?;
        Ok(Some(PrefixIds { text, ids }))
    }
}

fn ends_with_line_break(s: &str) -> bool {
    s.ends_with(['\n', '\r'])
}

pub(crate) fn build_example_with(
    record: &Record,
    tokenizer: &TextTokenizer,
    template: &Template,
    input_policy: InputPolicy,
    max_len: usize,
    prefix: Option<&PrefixIds>,
) -> Result<Processed> {
    let (source, target) = template.render(record, input_policy);
    let (source_ids, input_ids, truncated, boundary_mismatch) = if tokenizer.splits_at_line_breaks()
        && ends_with_line_break(&source)
    {
        // source + target tokenizes as source, then target: see `splits_at_line_breaks`.
        let mut body = match prefix {
            Some(p) if source.starts_with(&p.text) => {
                let rest = tokenizer.encode_raw(&source[p.text.len()..])?;
                let mut body = Vec::with_capacity(p.ids.len() + rest.len() + 1024);
                body.extend_from_slice(&p.ids);
                body.extend_from_slice(&rest);
                body
            }
            _ => tokenizer.encode_raw(&source)?,
        };
        let n_source = body.len();
        body.extend(tokenizer.encode_raw(&target)?);
        let (source_ids, _) = tokenizer.add_special_tokens_truncated(&body[..n_source], max_len)?;
        let (input_ids, truncated) = tokenizer.add_special_tokens_truncated(&body, max_len)?;
        (source_ids, input_ids, truncated, false)
    } else {
        let (source_ids, _) = tokenizer.encode_truncated(&source, max_len)?;
        let mut full = source;
        full.push_str(&target);
        let (input_ids, truncated) = tokenizer.encode_truncated(&full, max_len)?;
        let prefix = source_ids.len().min(input_ids.len());
        let mismatch = input_ids[..prefix] != source_ids[..prefix];
        (source_ids, input_ids, truncated, mismatch)
    };
    let example = Example::new(input_ids, source_ids.len());
    let source_len = source_ids.len().min(example.len());
    let drop = (source_len >= example.len()).then_some(if truncated {
        DropReason::PromptTooLong
    } else {
        DropReason::NoTargetTokens
    });
    Ok(Processed {
        example,
        source_len,
        truncated,
        boundary_mismatch,
        drop,
    })
}

/// Counts from preprocessing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Records read.
    pub records: usize,
    /// Examples kept.
    pub examples: usize,
    /// Records whose prompt alone filled `max_len` (dropped when `drop_fully_masked`).
    pub dropped_prompt_too_long: usize,
    /// Records whose target added no token (dropped when `drop_fully_masked`).
    pub dropped_no_target_tokens: usize,
    /// Kept examples that were truncated to `max_len`.
    pub truncated: usize,
    /// Kept examples whose full encoding does not start with the source encoding.
    pub boundary_mismatches: usize,
    /// Tokens in the kept examples.
    pub total_tokens: usize,
    /// Target (non-masked) tokens in the kept examples.
    pub target_tokens: usize,
    /// Longest kept example.
    pub longest: usize,
    /// Shortest kept example (0 when none).
    pub shortest: usize,
}

impl Summary {
    /// Examples dropped for any reason.
    pub fn dropped(&self) -> usize {
        self.dropped_prompt_too_long + self.dropped_no_target_tokens
    }

    /// Mean kept length.
    pub fn mean_len(&self) -> f64 {
        if self.examples == 0 {
            0.0
        } else {
            self.total_tokens as f64 / self.examples as f64
        }
    }

    /// Adds another summary (e.g. of the next chunk of records).
    pub fn merge(&mut self, o: &Summary) {
        let had = self.examples > 0;
        self.records += o.records;
        self.examples += o.examples;
        self.dropped_prompt_too_long += o.dropped_prompt_too_long;
        self.dropped_no_target_tokens += o.dropped_no_target_tokens;
        self.truncated += o.truncated;
        self.boundary_mismatches += o.boundary_mismatches;
        self.total_tokens += o.total_tokens;
        self.target_tokens += o.target_tokens;
        self.longest = self.longest.max(o.longest);
        self.shortest = match (had, o.examples > 0) {
            (true, true) => self.shortest.min(o.shortest),
            (false, _) => o.shortest,
            (true, false) => self.shortest,
        };
    }

    fn add(&mut self, p: &Processed, kept: bool) {
        self.records += 1;
        match p.drop {
            Some(DropReason::PromptTooLong) => self.dropped_prompt_too_long += 1,
            Some(DropReason::NoTargetTokens) => self.dropped_no_target_tokens += 1,
            None => {}
        }
        if kept {
            let len = p.example.len();
            self.shortest = if self.examples == 0 {
                len
            } else {
                self.shortest.min(len)
            };
            self.examples += 1;
            self.truncated += usize::from(p.truncated);
            self.boundary_mismatches += usize::from(p.boundary_mismatch);
            self.total_tokens += len;
            self.target_tokens += len - p.source_len;
            self.longest = self.longest.max(len);
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "records read         {}", self.records)?;
        writeln!(f, "examples kept       {}", self.examples)?;
        writeln!(
            f,
            "fully masked        {} (prompt too long: {}, no target tokens: {})",
            self.dropped(),
            self.dropped_prompt_too_long,
            self.dropped_no_target_tokens
        )?;
        writeln!(f, "truncated (kept)    {}", self.truncated)?;
        if self.boundary_mismatches > 0 {
            writeln!(f, "boundary mismatches {}", self.boundary_mismatches)?;
        }
        writeln!(
            f,
            "tokens              {} total, {} target ({:.1}%)",
            self.total_tokens,
            self.target_tokens,
            if self.total_tokens == 0 {
                0.0
            } else {
                100.0 * self.target_tokens as f64 / self.total_tokens as f64
            }
        )?;
        write!(
            f,
            "length              mean {:.1}, shortest {}, longest {}",
            self.mean_len(),
            self.shortest,
            self.longest
        )
    }
}

/// A progress bar that draws only when asked to, on a terminal, for long runs.
pub(crate) fn progress_bar(enabled: bool, total: Option<usize>) -> ProgressBar {
    let show = enabled
        && std::io::stderr().is_terminal()
        && total.is_none_or(|t| t >= PreprocessConfig::PROGRESS_MIN_RECORDS);
    if !show {
        return ProgressBar::hidden();
    }
    let (pb, template) = match total {
        Some(t) => (
            ProgressBar::with_draw_target(Some(t as u64), ProgressDrawTarget::stderr()),
            "tokenizing {bar:40} {pos}/{len} examples ({per_sec}, eta {eta})",
        ),
        None => (
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            "tokenizing {spinner} {pos} examples ({per_sec})",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style);
    }
    pb
}

/// Preprocesses records in parallel (rayon), in order. Returns the kept examples and the
/// summary. The result does not depend on the number of threads.
pub fn build_examples(
    records: &[Record],
    tokenizer: &TextTokenizer,
    config: &PreprocessConfig,
) -> Result<(Vec<Example>, Summary)> {
    config.validate()?;
    let pb = progress_bar(config.progress, Some(records.len()));
    let out = build_examples_inner(records, 0, tokenizer, config, &pb);
    pb.finish_and_clear();
    out
}

pub(crate) fn build_examples_inner(
    records: &[Record],
    first_index: usize,
    tokenizer: &TextTokenizer,
    config: &PreprocessConfig,
    pb: &ProgressBar,
) -> Result<(Vec<Example>, Summary)> {
    let max_len = config.effective_max_len(tokenizer)?;
    let prefix = PrefixIds::new(tokenizer, &config.template)?;
    let processed: Vec<Processed> = records
        .par_iter()
        .enumerate()
        .map(|(i, r)| {
            let p = build_example_with(
                r,
                tokenizer,
                &config.template,
                config.input_policy,
                max_len,
                prefix.as_ref(),
            )
            .map_err(|e| match e {
                Error::Tokenizer(m) => Error::Tokenizer(format!("record {}: {m}", first_index + i)),
                other => other,
            });
            pb.inc(1);
            p
        })
        .collect::<Result<_>>()?;
    let mut summary = Summary::default();
    let mut examples = Vec::with_capacity(processed.len());
    for p in processed {
        let kept = p.drop.is_none() || !config.drop_fully_masked;
        summary.add(&p, kept);
        if kept {
            examples.push(p.example);
        }
    }
    Ok((examples, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_masking() {
        let e = Example::new(vec![1, 2, 3, 4], 2);
        assert_eq!(e.labels, vec![-100, -100, 3, 4]);
        assert_eq!(e.attention_mask, vec![1, 1, 1, 1]);
        assert_eq!(e.n_target_tokens(), 2);
        let e = Example::new(vec![1, 2], 5);
        assert_eq!(e.labels, vec![-100, -100]);
    }

    #[test]
    fn summary_merge_and_display() {
        let mut a = Summary {
            records: 3,
            examples: 2,
            dropped_prompt_too_long: 1,
            total_tokens: 30,
            target_tokens: 10,
            longest: 20,
            shortest: 10,
            ..Default::default()
        };
        let b = Summary {
            records: 1,
            examples: 1,
            total_tokens: 5,
            target_tokens: 2,
            longest: 5,
            shortest: 5,
            ..Default::default()
        };
        a.merge(&b);
        assert_eq!(a.records, 4);
        assert_eq!(a.examples, 3);
        assert_eq!(a.shortest, 5);
        assert_eq!(a.longest, 20);
        assert_eq!(a.dropped(), 1);
        let s = a.to_string();
        assert!(s.contains("examples kept       3"), "{s}");
        assert!(s.contains("prompt too long: 1"), "{s}");
        let mut empty = Summary::default();
        empty.merge(&b);
        assert_eq!(empty.shortest, 5);
    }

    #[test]
    fn config_validate() {
        assert!(PreprocessConfig::default().validate().is_ok());
        let bad = PreprocessConfig {
            max_len: Some(1),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
