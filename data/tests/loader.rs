//! The loader: determinism, reshuffling, resumption, token budgets, padding.

mod common;

use std::collections::BTreeSet;

use common::{deepseek, fixture};
use moe_peft_data::{
    Batch, DataConfig, Error, Example, InstructionDataset, Loader, LoaderConfig, LoaderState,
    PreprocessConfig, IGNORE_INDEX,
};

const PAD: u32 = 100001;

fn examples() -> Vec<Example> {
    let cfg = DataConfig {
        preprocess: PreprocessConfig {
            progress: false,
            ..Default::default()
        },
        ..Default::default()
    };
    let d = InstructionDataset::load(&[fixture("data/tiny_instruct.parquet")], &deepseek(), &cfg)
        .unwrap();
    assert_eq!(d.pad_id, PAD);
    assert_eq!(d.examples.len(), 256);
    d.examples
}

fn orders(batches: &[Batch]) -> Vec<Vec<usize>> {
    batches.iter().map(|b| b.indices.clone()).collect()
}

/// Every batch is the exact right-padded collation of its examples.
fn check_padding(batch: &Batch, ex: &[Example], multiple: Option<usize>) {
    let longest = batch.indices.iter().map(|&i| ex[i].len()).max().unwrap();
    let expect_len = match multiple {
        Some(m) => longest.div_ceil(m) * m,
        None => longest,
    };
    assert_eq!(batch.seq_len, expect_len);
    assert_eq!(batch.batch_size, batch.indices.len());
    assert_eq!(batch.input_ids.len(), batch.batch_size * batch.seq_len);
    assert_eq!(batch.labels.len(), batch.input_ids.len());
    assert_eq!(batch.attention_mask.len(), batch.input_ids.len());
    let mut targets = 0;
    for (r, &i) in batch.indices.iter().enumerate() {
        let e = &ex[i];
        let n = e.len();
        assert_eq!(&batch.row_ids(r)[..n], &e.input_ids[..]);
        assert!(batch.row_ids(r)[n..].iter().all(|&t| t == PAD));
        assert_eq!(&batch.row_labels(r)[..n], &e.labels[..]);
        assert!(batch.row_labels(r)[n..].iter().all(|&l| l == IGNORE_INDEX));
        assert!(batch.row_mask(r)[..n].iter().all(|&m| m == 1));
        assert!(batch.row_mask(r)[n..].iter().all(|&m| m == 0));
        assert_eq!(batch.row_ids(r)[0], 100000, "BOS first");
        assert_eq!(batch.row_labels(r)[0], IGNORE_INDEX, "BOS never a target");
        targets += e.n_target_tokens();
    }
    assert_eq!(batch.n_target_tokens, targets);
    assert_eq!(
        batch.n_target_tokens,
        batch.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    );
}

#[test]
fn same_seed_same_batches_different_seed_different_order() {
    let ex = examples();
    let cfg = LoaderConfig::default()
        .batch_size(8)
        .seed(7)
        .epochs(Some(2));
    let a: Vec<Batch> = Loader::new(ex.clone(), PAD, cfg.clone()).unwrap().collect();
    let b: Vec<Batch> = Loader::new(ex.clone(), PAD, cfg.clone()).unwrap().collect();
    assert_eq!(a.len(), 64);
    assert_eq!(a, b);
    let c: Vec<Batch> = Loader::new(ex.clone(), PAD, cfg.clone().seed(8))
        .unwrap()
        .collect();
    assert_ne!(orders(&a), orders(&c));
    // Each epoch is a permutation, and epochs are reshuffled.
    let (e0, e1) = a.split_at(32);
    for epoch in [e0, e1] {
        let mut all: Vec<usize> = epoch.iter().flat_map(|b| b.indices.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..256).collect::<Vec<_>>());
    }
    assert_ne!(orders(e0), orders(e1));
    for batch in &a {
        check_padding(batch, &ex, None);
    }
    // Without shuffling, the order is the file order.
    let plain: Vec<Batch> = Loader::new(
        ex.clone(),
        PAD,
        LoaderConfig::default().batch_size(100).shuffle(false),
    )
    .unwrap()
    .collect();
    assert_eq!(plain.len(), 3);
    assert_eq!(plain[0].indices, (0..100).collect::<Vec<_>>());
    assert_eq!(plain[2].batch_size, 56);
}

/// Runs `k` steps, saves the state through JSON, restores into a new loader and checks both
/// yield identical remaining batches.
fn check_resume(ex: &[Example], cfg: &LoaderConfig, k: usize) -> LoaderState {
    let mut a = Loader::new(ex.to_vec(), PAD, cfg.clone()).unwrap();
    for _ in 0..k {
        a.next_batch().unwrap();
    }
    let state = a.state();
    let json = serde_json::to_string(&state).unwrap();
    let restored: LoaderState = serde_json::from_str(&json).unwrap();
    assert_eq!(restored, state);
    let b = Loader::restore(ex.to_vec(), PAD, cfg.clone(), &restored).unwrap();
    assert_eq!(b.remaining_steps(), a.remaining_steps());
    let rest_a: Vec<Batch> = a.collect();
    let rest_b: Vec<Batch> = b.collect();
    assert!(!rest_a.is_empty());
    assert_eq!(rest_a, rest_b);
    state
}

#[test]
fn resume_mid_epoch_and_across_epoch_boundary() {
    let ex = examples();
    let cfg = LoaderConfig::default()
        .batch_size(10)
        .seed(3)
        .epochs(Some(3));
    let steps = Loader::new(ex.clone(), PAD, cfg.clone())
        .unwrap()
        .steps_per_epoch();
    assert_eq!(steps, 26);
    // Mid-epoch.
    let s = check_resume(&ex, &cfg, 11);
    assert_eq!((s.epoch, s.position, s.steps), (0, 11, 11));
    // Exactly at the end of epoch 0 (next batch starts epoch 1).
    let s = check_resume(&ex, &cfg, steps);
    assert_eq!((s.epoch, s.position), (0, steps));
    // Just after the boundary, and mid epoch 1.
    let s = check_resume(&ex, &cfg, steps + 1);
    assert_eq!((s.epoch, s.position, s.steps), (1, 1, steps as u64 + 1));
    check_resume(&ex, &cfg, 2 * steps - 3);
    // With length grouping, a token budget and padding to a multiple, too.
    let cfg2 = LoaderConfig {
        group_by_length: true,
        megabatch_mult: Some(4),
        token_budget: Some(400),
        pad_to_multiple_of: Some(8),
        ..cfg.clone()
    };
    check_resume(&ex, &cfg2, 5);
    let per_epoch = Loader::new(ex.clone(), PAD, cfg2.clone())
        .unwrap()
        .steps_per_epoch();
    check_resume(&ex, &cfg2, per_epoch + 2);
    // A restored loader may run for more epochs than the original.
    let mut a = Loader::new(ex.clone(), PAD, cfg.clone()).unwrap();
    a.by_ref().take(5).for_each(drop);
    let longer = Loader::restore(ex.clone(), PAD, cfg.clone().epochs(Some(4)), &a.state()).unwrap();
    assert_eq!(longer.count(), 4 * steps - 5);
}

#[test]
fn restore_refuses_foreign_states() {
    let ex = examples();
    let cfg = LoaderConfig::default().batch_size(8);
    let mut l = Loader::new(ex.clone(), PAD, cfg.clone()).unwrap();
    l.next_batch();
    let state = l.state();
    let e = Loader::restore(ex.clone(), PAD, cfg.clone().seed(1), &state).unwrap_err();
    assert!(matches!(e, Error::StateMismatch(_)), "{e}");
    let e = Loader::restore(ex.clone(), PAD, cfg.clone().batch_size(9), &state).unwrap_err();
    assert!(matches!(e, Error::StateMismatch(_)), "{e}");
    let e = Loader::restore(ex[..200].to_vec(), PAD, cfg.clone(), &state).unwrap_err();
    assert!(matches!(e, Error::StateMismatch(_)), "{e}");
    let past = LoaderState {
        position: 1000,
        ..state
    };
    assert!(matches!(
        Loader::restore(ex, PAD, cfg, &past),
        Err(Error::StateMismatch(_))
    ));
}

#[test]
fn token_budget_is_never_exceeded() {
    let ex = examples();
    let longest = ex.iter().map(Example::len).max().unwrap();
    for (budget, multiple, group) in [
        (longest, None, false),
        (300, None, false),
        (512, Some(8), true),
        (1000, Some(16), false),
    ] {
        let cfg = LoaderConfig {
            batch_size: 64,
            token_budget: Some(budget),
            pad_to_multiple_of: multiple,
            group_by_length: group,
            epochs: Some(2),
            ..Default::default()
        };
        let loader = Loader::new(ex.clone(), PAD, cfg).unwrap();
        let mut seen = BTreeSet::new();
        let mut count = 0;
        for b in loader {
            assert!(
                b.n_padded_tokens() <= budget,
                "{} > {budget}",
                b.n_padded_tokens()
            );
            assert!(b.batch_size <= 64);
            check_padding(&b, &ex, multiple);
            count += b.batch_size;
            seen.extend(b.indices.iter().copied());
        }
        assert_eq!(count, 512, "every example once per epoch");
        assert_eq!(seen.len(), 256);
    }
    // An example that cannot fit is refused up front.
    let e = Loader::new(
        ex.clone(),
        PAD,
        LoaderConfig::default().token_budget(Some(longest - 1)),
    )
    .unwrap_err();
    assert!(matches!(e, Error::ExampleExceedsBudget { .. }), "{e}");
}

#[test]
fn drop_last_and_steps_per_epoch() {
    let ex = examples();
    let l = Loader::new(
        ex.clone(),
        PAD,
        LoaderConfig::default()
            .batch_size(24)
            .drop_last(true)
            .epochs(Some(2)),
    )
    .unwrap();
    assert_eq!(l.steps_per_epoch(), 10);
    assert_eq!(l.remaining_steps(), Some(20));
    let batches: Vec<Batch> = l.collect();
    assert_eq!(batches.len(), 20);
    assert!(batches.iter().all(|b| b.batch_size == 24));
    let l = Loader::new(ex.clone(), PAD, LoaderConfig::default().batch_size(24)).unwrap();
    assert_eq!(l.steps_per_epoch(), 11);
    assert_eq!(l.count(), 11);
    assert!(matches!(
        Loader::new(
            ex[..10].to_vec(),
            PAD,
            LoaderConfig::default().batch_size(24).drop_last(true)
        ),
        Err(Error::InvalidConfig(_))
    ));
}

#[test]
fn group_by_length_puts_similar_lengths_together() {
    let ex = examples();
    let cfg = LoaderConfig {
        batch_size: 8,
        group_by_length: true,
        ..Default::default()
    };
    let loader = Loader::new(ex.clone(), PAD, cfg.clone()).unwrap();
    let plan = loader.epoch_plan(0);
    let len = |i: usize| ex[i].len();
    // HF rule: megabatch = 8 * min(256 / 32, 50) = 64 examples, sorted longest first.
    let flat: Vec<usize> = plan.concat();
    let longest = ex.iter().map(Example::len).max().unwrap();
    assert_eq!(len(flat[0]), longest, "the longest example comes first");
    for mb in flat.chunks(64) {
        for w in mb[1..].windows(2) {
            assert!(len(w[0]) >= len(w[1]));
        }
    }
    // Less padding than random batches.
    let padded = |l: Loader| l.map(|b| b.n_padded_tokens()).sum::<usize>();
    let grouped = padded(loader);
    let random = padded(
        Loader::new(
            ex.clone(),
            PAD,
            LoaderConfig {
                group_by_length: false,
                ..cfg
            },
        )
        .unwrap(),
    );
    assert!(grouped < random, "{grouped} >= {random}");
}
