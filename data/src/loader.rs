//! A deterministic, resumable batch loader.
//!
//! Each epoch has a *plan*, a list of batches of dataset indices, built from nothing but the
//! configuration, the example lengths and `(seed, epoch)`:
//! 1. indices `0..n`, shuffled (Fisher–Yates with [`SplitMix64`] seeded from `(seed, epoch)`)
//!    when `shuffle` is on;
//! 2. with `group_by_length`, HF `get_length_grouped_indices`: cut into megabatches of
//!    `batch_size * megabatch_mult`, sort each by length (longest first, stable), then swap the
//!    overall longest example to the very front so that an out-of-memory shows up at step 0;
//! 3. cut into batches: `batch_size` examples each (the last one shorter unless `drop_last`), or,
//!    with a `token_budget`, greedily so that `rows × padded_len` never exceeds the budget (and
//!    rows never exceed `batch_size`).
//!
//! The plan does not depend on thread count or on what happened in earlier epochs, so a
//! [`LoaderState`] `{epoch, position}` is enough to resume exactly.
//!
//! The shuffled order is not the one PyTorch's `RandomSampler` would draw (different generator);
//! it is a uniform permutation all the same.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::batch::{collate, collate_packed, padded_len, Batch};
use crate::error::{Error, Result};
use crate::example::Example;
use crate::rng::{Fnv64, SplitMix64};

/// Loader options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoaderConfig {
    /// Examples per batch (with a token budget: the most examples per batch). Default 16 (the
    /// reference README's `per_device_train_batch_size`).
    pub batch_size: usize,
    /// Shuffle each epoch (default `true`).
    pub shuffle: bool,
    /// Seed of the shuffles (default 42, HF `TrainingArguments.seed`).
    pub seed: u64,
    /// Number of epochs the iterator runs for; `None` runs forever. Default `Some(1)`.
    pub epochs: Option<u64>,
    /// Drop each epoch's last, incomplete batch (fixed-size batches only). Default `false`.
    pub drop_last: bool,
    /// Group examples of similar length (HF `group_by_length`). Default `false`.
    pub group_by_length: bool,
    /// Megabatch size in batches for `group_by_length`; `None` uses HF's rule
    /// `max(1, min(n / (4 * batch_size), 50))`.
    pub megabatch_mult: Option<usize>,
    /// Cap on `rows × padded seq_len` per batch instead of a fixed row count. Default `None`.
    pub token_budget: Option<usize>,
    /// Round every batch's `seq_len` up to a multiple of this. Default `None`.
    pub pad_to_multiple_of: Option<usize>,
    /// Pack several examples into each row of this many tokens (TRL's `packing`, with
    /// per-example attention): each batch holds `batch_size` rows, each row examples placed by
    /// best-fit decreasing within windows of [`PACK_WINDOW`] shuffled examples, and the batch's
    /// `attention_mask` numbers the examples of a row 1, 2, … (0 on padding) so that attention
    /// stays inside each example. Default `None` (one example per row).
    #[serde(default)]
    pub packing: Option<usize>,
}

/// Examples packed together at a time (best-fit decreasing inside each window, so the shuffle
/// still decides which examples meet).
pub const PACK_WINDOW: usize = 2048;

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 16,
            shuffle: true,
            seed: 42,
            epochs: Some(1),
            drop_last: false,
            group_by_length: false,
            megabatch_mult: None,
            token_budget: None,
            pad_to_multiple_of: None,
            packing: None,
        }
    }
}

impl LoaderConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidConfig(m.into()));
        if self.batch_size == 0 {
            return bad("batch_size must be > 0");
        }
        if self.megabatch_mult == Some(0) {
            return bad("megabatch_mult must be > 0");
        }
        if self.token_budget == Some(0) {
            return bad("token_budget must be > 0");
        }
        if self.pad_to_multiple_of == Some(0) {
            return bad("pad_to_multiple_of must be > 0");
        }
        if self.token_budget.is_some() && self.drop_last {
            return bad(
                "drop_last applies to fixed-size batches; it cannot be combined with token_budget",
            );
        }
        if self.epochs == Some(0) {
            return bad("epochs must be > 0 (or None for endless)");
        }
        if self.packing == Some(0) {
            return bad("packing length must be > 0");
        }
        if self.packing.is_some() && (self.group_by_length || self.token_budget.is_some()) {
            return bad("packing fills rows itself: it cannot be combined with group_by_length or token_budget");
        }
        Ok(())
    }

    /// Sets the batch size.
    #[must_use]
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// Sets the seed.
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the number of epochs (`None`: endless).
    #[must_use]
    pub fn epochs(mut self, epochs: Option<u64>) -> Self {
        self.epochs = epochs;
        self
    }

    /// Turns shuffling on or off.
    #[must_use]
    pub fn shuffle(mut self, on: bool) -> Self {
        self.shuffle = on;
        self
    }

    /// Sets `drop_last`.
    #[must_use]
    pub fn drop_last(mut self, on: bool) -> Self {
        self.drop_last = on;
        self
    }

    /// Sets `group_by_length`.
    #[must_use]
    pub fn group_by_length(mut self, on: bool) -> Self {
        self.group_by_length = on;
        self
    }

    /// Sets the token budget.
    #[must_use]
    pub fn token_budget(mut self, budget: Option<usize>) -> Self {
        self.token_budget = budget;
        self
    }

    /// Packs examples into rows of `len` tokens (`None`: one example per row).
    #[must_use]
    pub fn packing(mut self, len: Option<usize>) -> Self {
        self.packing = len;
        self
    }

    /// Sets `pad_to_multiple_of`.
    #[must_use]
    pub fn pad_to_multiple_of(mut self, m: Option<usize>) -> Self {
        self.pad_to_multiple_of = m;
        self
    }
}

/// Where a loader is, serializable for checkpoints.
///
/// Restoring with [`Loader::restore`] yields exactly the batches the saved loader would have
/// yielded next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Batches of this epoch already yielded.
    pub position: usize,
    /// Batches yielded since the start of training (all epochs).
    pub steps: u64,
    /// The shuffle seed.
    pub seed: u64,
    /// A hash of the example lengths and of the plan-shaping options, to refuse a state that
    /// belongs to another dataset or configuration.
    pub fingerprint: u64,
}

/// Yields padded [`Batch`]es epoch after epoch. Also an [`Iterator`] of batches.
#[derive(Debug, Clone)]
pub struct Loader {
    examples: Arc<[Example]>,
    lengths: Vec<usize>,
    pad_id: u32,
    config: LoaderConfig,
    fingerprint: u64,
    epoch: u64,
    position: usize,
    steps: u64,
    plan: Vec<Vec<usize>>,
    /// With packing: the rows of each planned batch, as example indices.
    rows: Vec<Vec<Vec<usize>>>,
}

impl Loader {
    /// A loader at the start of epoch 0.
    ///
    /// Fails on an empty dataset ([`Error::EmptyDataset`]), on an example that cannot fit the
    /// token budget ([`Error::ExampleExceedsBudget`]), on an example whose three vectors differ in
    /// length, and when `drop_last` would leave no batch.
    pub fn new(
        examples: impl Into<Arc<[Example]>>,
        pad_id: u32,
        config: LoaderConfig,
    ) -> Result<Self> {
        config.validate()?;
        let examples: Arc<[Example]> = examples.into();
        if examples.is_empty() {
            return Err(Error::EmptyDataset);
        }
        for (i, e) in examples.iter().enumerate() {
            if e.labels.len() != e.len() || e.attention_mask.len() != e.len() {
                return Err(Error::InvalidConfig(format!(
                    "example {i}: input_ids, labels and attention_mask have different lengths ({}, {}, {})",
                    e.len(),
                    e.labels.len(),
                    e.attention_mask.len()
                )));
            }
        }
        let lengths: Vec<usize> = examples.iter().map(Example::len).collect();
        if let Some(budget) = config.packing {
            for (index, &len) in lengths.iter().enumerate() {
                if len > budget {
                    return Err(Error::ExampleExceedsBudget { index, len, budget });
                }
            }
        }
        if let Some(budget) = config.token_budget {
            for (index, &len) in lengths.iter().enumerate() {
                let len = padded_len(len, config.pad_to_multiple_of);
                if len > budget {
                    return Err(Error::ExampleExceedsBudget { index, len, budget });
                }
            }
        }
        if config.drop_last && config.token_budget.is_none() && examples.len() < config.batch_size {
            return Err(Error::InvalidConfig(format!(
                "drop_last with batch_size {} and only {} examples yields no batch",
                config.batch_size,
                examples.len()
            )));
        }
        let fingerprint = fingerprint(&lengths, &config);
        let mut loader = Loader {
            examples,
            lengths,
            pad_id,
            config,
            fingerprint,
            epoch: 0,
            position: 0,
            steps: 0,
            plan: Vec::new(),
            rows: Vec::new(),
        };
        loader.set_plan(0);
        Ok(loader)
    }

    /// A loader positioned at a saved state. The examples and plan-shaping options must be those
    /// the state was saved with ([`Error::StateMismatch`] otherwise); `epochs` may differ.
    pub fn restore(
        examples: impl Into<Arc<[Example]>>,
        pad_id: u32,
        config: LoaderConfig,
        state: &LoaderState,
    ) -> Result<Self> {
        let mut loader = Loader::new(examples, pad_id, config)?;
        loader.set_state(state)?;
        Ok(loader)
    }

    /// Moves this loader to a saved state (see [`Loader::restore`]).
    pub fn set_state(&mut self, state: &LoaderState) -> Result<()> {
        if state.seed != self.config.seed {
            return Err(Error::StateMismatch(format!(
                "state seed {} != configured seed {}",
                state.seed, self.config.seed
            )));
        }
        if state.fingerprint != self.fingerprint {
            return Err(Error::StateMismatch(
                "dataset or batching options differ from those the state was saved with".into(),
            ));
        }
        let plan = self.epoch_plan(state.epoch);
        if state.position > plan.len() {
            return Err(Error::StateMismatch(format!(
                "position {} is past the {} batches of epoch {}",
                state.position,
                plan.len(),
                state.epoch
            )));
        }
        self.set_plan(state.epoch);
        self.epoch = state.epoch;
        self.position = state.position;
        self.steps = state.steps;
        Ok(())
    }

    /// The current state (save it with the model checkpoint).
    pub fn state(&self) -> LoaderState {
        LoaderState {
            epoch: self.epoch,
            position: self.position,
            steps: self.steps,
            seed: self.config.seed,
            fingerprint: self.fingerprint,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// The examples.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// The pad id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Current epoch (0-based).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Batches yielded so far in the current epoch.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Batches in the current epoch. With fixed-size batches this is the same every epoch
    /// (`ceil(n / batch_size)`, or `floor` with `drop_last`); with a token budget it can vary
    /// slightly from epoch to epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.plan.len()
    }

    /// Batches left until the configured number of epochs is done (`None` when endless).
    pub fn remaining_steps(&self) -> Option<u64> {
        let epochs = self.config.epochs?;
        if self.epoch >= epochs {
            return Some(0);
        }
        let mut left = (self.plan.len() - self.position) as u64;
        for e in self.epoch + 1..epochs {
            left += if self.config.token_budget.is_some() || self.config.packing.is_some() {
                self.epoch_plan(e).len() as u64
            } else {
                self.plan.len() as u64
            };
        }
        Some(left)
    }

    /// Makes `epoch`'s plan the current one.
    fn set_plan(&mut self, epoch: u64) {
        if self.config.packing.is_some() {
            self.rows = self.packed_plan(epoch);
            self.plan = self.rows.iter().map(|b| b.concat()).collect();
        } else {
            self.plan = self.epoch_plan(epoch);
            self.rows.clear();
        }
    }

    /// With packing: the batches of an epoch, each a list of rows of dataset indices.
    pub fn packed_plan(&self, epoch: u64) -> Vec<Vec<Vec<usize>>> {
        let Some(cap) = self.config.packing else {
            return self
                .epoch_plan(epoch)
                .into_iter()
                .map(|b| b.into_iter().map(|i| vec![i]).collect())
                .collect();
        };
        let n = self.lengths.len();
        let mut order: Vec<usize> = (0..n).collect();
        if self.config.shuffle {
            SplitMix64::for_stream(self.config.seed, epoch).shuffle(&mut order);
        }
        let len = &self.lengths;
        let mut rows: Vec<Vec<usize>> = Vec::new();
        for (w, window) in order.chunks(PACK_WINDOW).enumerate() {
            let mut items = window.to_vec();
            // Longest first; ties keep the shuffled order (stable sort).
            items.sort_by(|&a, &b| len[b].cmp(&len[a]));
            let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
            for i in items {
                let best = bins
                    .iter()
                    .enumerate()
                    .filter(|(_, (free, _))| *free >= len[i])
                    .min_by_key(|(k, (free, _))| (*free, *k))
                    .map(|(k, _)| k);
                match best {
                    Some(k) => {
                        bins[k].0 -= len[i];
                        bins[k].1.push(i);
                    }
                    None => bins.push((cap - len[i], vec![i])),
                }
            }
            let mut wrows: Vec<Vec<usize>> = bins.into_iter().map(|(_, r)| r).collect();
            if self.config.shuffle {
                SplitMix64::for_stream(
                    self.config.seed ^ 0x7061_636B_696E_6721,
                    (epoch << 24) ^ w as u64,
                )
                .shuffle(&mut wrows);
            }
            rows.extend(wrows);
        }
        let bs = self.config.batch_size;
        rows.chunks(bs)
            .filter(|c| !(self.config.drop_last && c.len() < bs))
            .map(<[Vec<usize>]>::to_vec)
            .collect()
    }

    /// The batches (dataset indices) of an epoch (with packing, each batch's rows concatenated).
    pub fn epoch_plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        if self.config.packing.is_some() {
            return self
                .packed_plan(epoch)
                .into_iter()
                .map(|b| b.concat())
                .collect();
        }
        let n = self.lengths.len();
        let mut order: Vec<usize> = (0..n).collect();
        if self.config.shuffle {
            SplitMix64::for_stream(self.config.seed, epoch).shuffle(&mut order);
        }
        if self.config.group_by_length {
            self.group_by_length(&mut order);
        }
        match self.config.token_budget {
            None => {
                let bs = self.config.batch_size;
                order
                    .chunks(bs)
                    .filter(|c| !(self.config.drop_last && c.len() < bs))
                    .map(<[usize]>::to_vec)
                    .collect()
            }
            Some(budget) => {
                let mut plan = Vec::new();
                let mut cur: Vec<usize> = Vec::new();
                let mut cur_max = 0;
                for i in order {
                    let new_max = cur_max.max(self.lengths[i]);
                    let cost =
                        (cur.len() + 1) * padded_len(new_max, self.config.pad_to_multiple_of);
                    if !cur.is_empty() && (cost > budget || cur.len() == self.config.batch_size) {
                        plan.push(std::mem::take(&mut cur));
                        cur_max = 0;
                    }
                    cur_max = cur_max.max(self.lengths[i]);
                    cur.push(i);
                }
                if !cur.is_empty() {
                    plan.push(cur);
                }
                plan
            }
        }
    }

    /// HF `get_length_grouped_indices`, applied to an already shuffled order.
    fn group_by_length(&self, order: &mut [usize]) {
        let n = order.len();
        let bs = self.config.batch_size;
        let mult = self
            .config
            .megabatch_mult
            .unwrap_or_else(|| (n / (bs * 4)).clamp(1, 50));
        let mega = bs * mult;
        let len = &self.lengths;
        for chunk in order.chunks_mut(mega) {
            chunk.sort_by(|&a, &b| len[b].cmp(&len[a]));
        }
        // Put the longest element first (HF swaps the first element of the first megabatch with
        // the first element of the megabatch holding the maximum; argmax takes the first maximum).
        let mut best = 0;
        for start in (0..n).step_by(mega) {
            if len[order[start]] > len[order[best]] {
                best = start;
            }
        }
        order.swap(0, best);
    }

    /// The next batch, moving to the next epoch when the current one is done; `None` once the
    /// configured number of epochs is over.
    pub fn next_batch(&mut self) -> Option<Batch> {
        if let Some(epochs) = self.config.epochs {
            if self.epoch >= epochs {
                return None;
            }
        }
        if self.position >= self.plan.len() {
            let next = self.epoch + 1;
            if self.config.epochs.is_some_and(|e| next >= e) {
                self.epoch = next;
                self.position = 0;
                self.plan.clear();
                return None;
            }
            self.epoch = next;
            self.position = 0;
            self.set_plan(next);
            if self.plan.is_empty() {
                return None;
            }
        }
        let indices = &self.plan[self.position];
        let batch = if self.config.packing.is_some() {
            let rows: Vec<Vec<&Example>> = self.rows[self.position]
                .iter()
                .map(|r| r.iter().map(|&i| &self.examples[i]).collect())
                .collect();
            collate_packed(&rows, indices, self.pad_id, self.config.pad_to_multiple_of)
        } else {
            let rows: Vec<&Example> = indices.iter().map(|&i| &self.examples[i]).collect();
            collate(&rows, indices, self.pad_id, self.config.pad_to_multiple_of)
        };
        self.position += 1;
        self.steps += 1;
        Some(batch)
    }
}

impl Iterator for Loader {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        self.next_batch()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self.remaining_steps() {
            Some(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                (n, Some(n))
            }
            None => (usize::MAX, None),
        }
    }
}

fn fingerprint(lengths: &[usize], c: &LoaderConfig) -> u64 {
    let mut h = Fnv64::new();
    h.write_u64(lengths.len() as u64);
    for &l in lengths {
        h.write_u64(l as u64);
    }
    h.write_u64(c.batch_size as u64);
    h.write(&[
        u8::from(c.shuffle),
        u8::from(c.drop_last),
        u8::from(c.group_by_length),
    ]);
    for o in [
        c.megabatch_mult,
        c.token_budget,
        c.pad_to_multiple_of,
        c.packing,
    ] {
        h.write_u64(o.map_or(u64::MAX, |x| x as u64));
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(lens: &[usize]) -> Vec<Example> {
        lens.iter()
            .enumerate()
            .map(|(i, &l)| Example::new(vec![i as u32; l], 1))
            .collect()
    }

    #[test]
    fn plan_covers_every_index_once() {
        let ex = examples(&[3; 10]);
        let l = Loader::new(ex, 0, LoaderConfig::default().batch_size(3)).unwrap();
        let plan = l.epoch_plan(0);
        assert_eq!(plan.len(), 4);
        let mut all: Vec<usize> = plan.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_ne!(l.epoch_plan(0), l.epoch_plan(1));
    }

    #[test]
    fn drop_last_and_no_shuffle() {
        let ex = examples(&[2; 10]);
        let cfg = LoaderConfig::default()
            .batch_size(4)
            .shuffle(false)
            .drop_last(true);
        let l = Loader::new(ex, 0, cfg).unwrap();
        assert_eq!(l.epoch_plan(0), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert_eq!(l.steps_per_epoch(), 2);
    }

    #[test]
    fn group_by_length_matches_hf() {
        // HF get_length_grouped_indices on an unshuffled order [0..8), batch 2, mega_batch_mult 2:
        // megabatches [0,1,2,3] [4,5,6,7] sorted by length desc, then longest moved to the front.
        let lens = [1, 5, 3, 2, 4, 9, 9, 1];
        let cfg = LoaderConfig {
            batch_size: 2,
            shuffle: false,
            group_by_length: true,
            megabatch_mult: Some(2),
            ..Default::default()
        };
        let l = Loader::new(examples(&lens), 0, cfg).unwrap();
        // mb0 sorted: [1(5),2(3),3(2),0(1)], mb1 sorted: [5(9),6(9),4(4),7(1)]; swap firsts.
        assert_eq!(l.epoch_plan(0).concat(), vec![5, 2, 3, 0, 1, 6, 4, 7]);
    }

    #[test]
    fn packing_fills_rows_and_covers_every_example_once() {
        let lens: Vec<usize> = (0..500).map(|i| 5 + (i * 37) % 60).collect();
        let cfg = LoaderConfig::default().batch_size(4).packing(Some(64));
        let l = Loader::new(examples(&lens), 0, cfg.clone()).unwrap();
        let plan = l.packed_plan(0);
        let mut all: Vec<usize> = plan.iter().flatten().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..500).collect::<Vec<_>>());
        let mut used = 0;
        let mut rows = 0;
        for b in &plan {
            assert!(b.len() <= 4);
            for r in b {
                let t: usize = r.iter().map(|&i| lens[i]).sum();
                assert!(t <= 64, "row of {t} tokens");
                used += t;
                rows += 1;
            }
        }
        let fill = used as f64 / (rows * 64) as f64;
        assert!(fill > 0.95, "rows only {fill:.3} full");
        assert_ne!(l.packed_plan(0), l.packed_plan(1));
        // Resuming mid-epoch gives the same batches.
        let mut a = Loader::new(examples(&lens), 0, cfg.clone().epochs(None)).unwrap();
        for _ in 0..7 {
            a.next_batch();
        }
        let st = a.state();
        let mut b = Loader::restore(examples(&lens), 0, cfg.clone().epochs(None), &st).unwrap();
        for _ in 0..40 {
            assert_eq!(a.next_batch(), b.next_batch());
        }
        // A state from an unpacked loader is refused.
        let c = Loader::new(examples(&lens), 0, LoaderConfig::default().batch_size(4)).unwrap();
        assert!(Loader::restore(examples(&lens), 0, cfg, &c.state()).is_err());
        assert!(matches!(
            Loader::new(
                examples(&[5, 70]),
                0,
                LoaderConfig::default().packing(Some(64))
            ),
            Err(Error::ExampleExceedsBudget {
                index: 1,
                len: 70,
                budget: 64
            })
        ));
        assert!(LoaderConfig::default()
            .packing(Some(64))
            .group_by_length(true)
            .validate()
            .is_err());
    }

    #[test]
    fn config_validation() {
        assert!(LoaderConfig::default().validate().is_ok());
        assert!(LoaderConfig::default().batch_size(0).validate().is_err());
        assert!(LoaderConfig::default()
            .token_budget(Some(10))
            .drop_last(true)
            .validate()
            .is_err());
        assert!(matches!(
            Loader::new(Vec::<Example>::new(), 0, LoaderConfig::default()),
            Err(Error::EmptyDataset)
        ));
        let mut bad = examples(&[3]);
        bad[0].labels.pop();
        assert!(matches!(
            Loader::new(bad, 0, LoaderConfig::default()),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(
            Loader::new(
                examples(&[5, 20]),
                0,
                LoaderConfig::default().token_budget(Some(16))
            ),
            Err(Error::ExampleExceedsBudget {
                index: 1,
                len: 20,
                budget: 16
            })
        ));
    }

    #[test]
    fn endless_and_remaining() {
        let ex = examples(&[2; 5]);
        let mut l = Loader::new(
            ex.clone(),
            0,
            LoaderConfig::default().batch_size(2).epochs(Some(3)),
        )
        .unwrap();
        assert_eq!(l.remaining_steps(), Some(9));
        assert_eq!(l.by_ref().count(), 9);
        assert_eq!(l.remaining_steps(), Some(0));
        assert!(l.next_batch().is_none());
        let mut l = Loader::new(ex, 0, LoaderConfig::default().batch_size(2).epochs(None)).unwrap();
        assert_eq!(l.remaining_steps(), None);
        for _ in 0..100 {
            assert!(l.next_batch().is_some());
        }
        assert_eq!(l.epoch(), 33);
    }
}
