//! Padding examples into a rectangular batch (the reference's `DataCollatorForSupervisedDataset`).

use serde::{Deserialize, Serialize};

use crate::example::{Example, IGNORE_INDEX};

/// A padded batch, row-major `[batch_size, seq_len]`.
///
/// Padding is on the right: `input_ids` with the pad id, `labels` with `-100`, `attention_mask`
/// with 0. The attention mask is 1 exactly on the real tokens.
///
/// The reference builds its mask as `input_ids.ne(pad_token_id)`; with pad = EOS this also masks
/// any genuine EOS token inside a sequence. With the reference template no EOS occurs in the text,
/// so both rules agree; with [`Template::DeepSeekChat`](crate::Template::DeepSeekChat), whose
/// targets end in EOS, the length-based mask used here keeps that EOS visible (as HF's padding
/// with `return_attention_mask` would).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Token ids, `batch_size * seq_len`.
    pub input_ids: Vec<u32>,
    /// Labels, `-100` on prompts and pads.
    pub labels: Vec<i64>,
    /// 1 on real tokens, 0 on pads.
    pub attention_mask: Vec<u32>,
    /// Rows.
    pub batch_size: usize,
    /// Columns (the longest row, rounded up to `pad_to_multiple_of`).
    pub seq_len: usize,
    /// Labels that are not `-100`. The causal-LM loss shifts labels by one; position 0 is the
    /// masked BOS, so this is also the number of loss terms.
    pub n_target_tokens: usize,
    /// The dataset indices of the rows, in order (with packing, of the examples in row order).
    pub indices: Vec<usize>,
    /// Several examples share a row: `attention_mask` numbers them 1, 2, … within each row
    /// (0 on padding), and a token attends only to earlier tokens of its own example.
    #[serde(default)]
    pub packed: bool,
}

impl Batch {
    /// Row `i` of `input_ids`.
    pub fn row_ids(&self, i: usize) -> &[u32] {
        &self.input_ids[i * self.seq_len..(i + 1) * self.seq_len]
    }

    /// Row `i` of `labels`.
    pub fn row_labels(&self, i: usize) -> &[i64] {
        &self.labels[i * self.seq_len..(i + 1) * self.seq_len]
    }

    /// Row `i` of `attention_mask`.
    pub fn row_mask(&self, i: usize) -> &[u32] {
        &self.attention_mask[i * self.seq_len..(i + 1) * self.seq_len]
    }

    /// Number of real (unpadded) tokens.
    pub fn n_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m != 0).count()
    }

    /// `batch_size * seq_len`.
    pub fn n_padded_tokens(&self) -> usize {
        self.batch_size * self.seq_len
    }
}

/// Rounds `len` up to a multiple of `multiple` (unchanged for `None` or 0).
pub fn padded_len(len: usize, multiple: Option<usize>) -> usize {
    match multiple {
        Some(m) if m > 1 => len.div_ceil(m) * m,
        _ => len,
    }
}

/// Pads examples into one batch, right-padded to the longest (rounded up to
/// `pad_to_multiple_of`). `indices` are recorded in [`Batch::indices`].
///
/// # Panics
///
/// If an example's `labels` or `attention_mask` is shorter than its `input_ids` (examples built
/// by this crate never are; [`Loader::new`](crate::Loader::new) checks hand-made ones).
pub fn collate(
    examples: &[&Example],
    indices: &[usize],
    pad_id: u32,
    pad_to_multiple_of: Option<usize>,
) -> Batch {
    let longest = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    let seq_len = padded_len(longest, pad_to_multiple_of);
    let n = examples.len();
    let mut input_ids = vec![pad_id; n * seq_len];
    let mut labels = vec![IGNORE_INDEX; n * seq_len];
    let mut attention_mask = vec![0u32; n * seq_len];
    let mut n_target_tokens = 0;
    for (r, e) in examples.iter().enumerate() {
        let row = r * seq_len;
        let len = e.len();
        input_ids[row..row + len].copy_from_slice(&e.input_ids);
        labels[row..row + len].copy_from_slice(&e.labels);
        for (dst, &m) in attention_mask[row..row + len]
            .iter_mut()
            .zip(&e.attention_mask)
        {
            *dst = u32::from(m);
        }
        n_target_tokens += e.n_target_tokens();
    }
    Batch {
        input_ids,
        labels,
        attention_mask,
        batch_size: n,
        seq_len,
        n_target_tokens,
        indices: indices.to_vec(),
        packed: false,
    }
}

/// Packs rows of examples into one batch: each row holds its examples back to back, then
/// padding up to the longest row (rounded up to `pad_to_multiple_of`). The attention mask
/// numbers the examples of a row 1, 2, … (0 on padding); the first label of every example is
/// `-100`, so no loss term predicts one example from the one before it.
pub fn collate_packed(
    rows: &[Vec<&Example>],
    indices: &[usize],
    pad_id: u32,
    pad_to_multiple_of: Option<usize>,
) -> Batch {
    let longest = rows
        .iter()
        .map(|r| r.iter().map(|e| e.len()).sum::<usize>())
        .max()
        .unwrap_or(0);
    let seq_len = padded_len(longest, pad_to_multiple_of);
    let n = rows.len();
    let mut input_ids = vec![pad_id; n * seq_len];
    let mut labels = vec![IGNORE_INDEX; n * seq_len];
    let mut attention_mask = vec![0u32; n * seq_len];
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * seq_len;
        for (k, e) in row.iter().enumerate() {
            let len = e.len();
            input_ids[at..at + len].copy_from_slice(&e.input_ids);
            labels[at..at + len].copy_from_slice(&e.labels);
            if len > 0 {
                labels[at] = IGNORE_INDEX;
            }
            for (dst, &m) in attention_mask[at..at + len]
                .iter_mut()
                .zip(&e.attention_mask)
            {
                *dst = if m != 0 { k as u32 + 1 } else { 0 };
            }
            at += len;
        }
    }
    let n_target_tokens = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    Batch {
        input_ids,
        labels,
        attention_mask,
        batch_size: n,
        seq_len,
        n_target_tokens,
        indices: indices.to_vec(),
        packed: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collate_pads_right() {
        let a = Example::new(vec![10, 11, 12, 13], 2);
        let b = Example::new(vec![20, 21], 1);
        let batch = collate(&[&a, &b], &[0, 1], 7, None);
        assert_eq!(batch.seq_len, 4);
        assert_eq!(batch.input_ids, vec![10, 11, 12, 13, 20, 21, 7, 7]);
        assert_eq!(batch.labels, vec![-100, -100, 12, 13, -100, 21, -100, -100]);
        assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 1, 1, 0, 0]);
        assert_eq!(batch.n_target_tokens, 3);
        assert_eq!(batch.n_tokens(), 6);
        assert_eq!(batch.row_ids(1), &[20, 21, 7, 7]);

        let batch = collate(&[&a, &b], &[0, 1], 7, Some(8));
        assert_eq!(batch.seq_len, 8);
        assert_eq!(batch.row_mask(0), &[1, 1, 1, 1, 0, 0, 0, 0]);
        assert_eq!(batch.n_padded_tokens(), 16);
    }

    #[test]
    fn collate_packed_numbers_examples() {
        let a = Example::new(vec![10, 11, 12, 13], 2);
        let b = Example::new(vec![20, 21], 1);
        let c = Example::new(vec![30, 31, 32], 1);
        let batch = collate_packed(&[vec![&a, &b], vec![&c]], &[0, 1, 2], 7, None);
        assert!(batch.packed);
        assert_eq!(batch.seq_len, 6);
        assert_eq!(
            batch.input_ids,
            vec![10, 11, 12, 13, 20, 21, 30, 31, 32, 7, 7, 7]
        );
        assert_eq!(
            batch.labels,
            vec![-100, -100, 12, 13, -100, 21, -100, 31, 32, -100, -100, -100]
        );
        assert_eq!(
            batch.attention_mask,
            vec![1, 1, 1, 1, 2, 2, 1, 1, 1, 0, 0, 0]
        );
        assert_eq!(batch.n_target_tokens, 5);
        assert_eq!(batch.n_tokens(), 9);
    }

    #[test]
    fn padded_len_rounds_up() {
        assert_eq!(padded_len(5, None), 5);
        assert_eq!(padded_len(5, Some(0)), 5);
        assert_eq!(padded_len(5, Some(8)), 8);
        assert_eq!(padded_len(16, Some(8)), 16);
    }
}
