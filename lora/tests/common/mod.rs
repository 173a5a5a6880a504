#![allow(dead_code)]
//! What several integration tests train on (the tiny DeepSeekMoE with random weights and
//! counting sequences, each next token predictable) and how they check a resumed run.

use anyhow::Result;
use candle_core::{DType, Device, Var};
use moe_peft_lora::{LoraConfig, LoraModel, TargetModules, TrainBatch, TrainConfig, Trainer};
use moe_peft_model::{DeepSeekMoeConfig, LoadOptions, MoeModel};

/// The tiny DeepSeekMoE (vocabulary 128, 64 positions), random weights of seed 7.
pub fn tiny_base() -> Result<MoeModel> {
    let mut cfg = DeepSeekMoeConfig::tiny(128);
    cfg.max_position_embeddings = 64;
    Ok(MoeModel::random(cfg, &LoadOptions::default(), 7)?)
}

/// Batch `step` of counting sequences: 2 rows of 12 tokens, the first 3 of each unlabelled.
pub fn counting_batch(step: usize) -> Result<TrainBatch> {
    counting_rows(step, 12, 3, &|_, _| false)
}

/// Batch `k` of two counting rows of `s` tokens (`t, t+1, …` mod 128: each next token is
/// predictable; row `r` starts at `(37k + 61r) mod 128`), the first `unlabelled` positions of
/// each without a label, and the positions where `pad(row, t)` holds padding (id 1, masked,
/// unlabelled).
pub fn counting_rows(
    k: usize,
    s: usize,
    unlabelled: usize,
    pad: &dyn Fn(usize, usize) -> bool,
) -> Result<TrainBatch> {
    let b = 2usize;
    let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for row in 0..b {
        let start = (k * 37 + row * 61) % 128;
        for t in 0..s {
            let pad = pad(row, t);
            let id = if pad { 1 } else { ((start + t) % 128) as u32 };
            ids.push(id);
            mask.push(u32::from(!pad));
            labels.push(if pad || t < unlabelled {
                -100
            } else {
                id as i64
            });
        }
    }
    Ok(TrainBatch::from_host(
        &ids,
        &mask,
        &labels,
        b,
        s,
        &Device::Cpu,
    )?)
}

/// LoRA on every DeepSeekMoE projection, routed experts included.
pub fn deepseek_lora(r: usize, lora_alpha: f64, lora_dropout: f64) -> LoraConfig {
    LoraConfig {
        r,
        lora_alpha,
        lora_dropout,
        target_modules: Some(TargetModules::List(
            moe_peft_lora::DEEPSEEK_TARGETS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )),
        ..Default::default()
    }
}

/// Trains `lm()` for `steps` steps of counting batches, saving a checkpoint after `at`, then
/// resumes a fresh `lm()` from that checkpoint to the same step: returns (uninterrupted,
/// resumed), having checked that every resumed step's loss equals the uninterrupted one's.
pub fn train_checkpoint_resume(
    lm: &dyn Fn() -> Result<LoraModel>,
    cfg: TrainConfig,
    at: usize,
    steps: usize,
) -> Result<(Trainer, Trainer)> {
    let dir = tempfile::tempdir()?;
    let mut full = Trainer::new(lm()?, cfg.clone())?;
    let mut losses = Vec::new();
    for s in 0..at {
        losses.push(full.step(&[counting_batch(s)?])?.loss);
    }
    let ck = full.save_checkpoint(dir.path(), serde_json::json!({}), None)?;
    for s in at..steps {
        losses.push(full.step(&[counting_batch(s)?])?.loss);
    }
    let (mut resumed, _) = Trainer::resume(lm()?, cfg, &ck)?;
    for (s, want) in losses.iter().enumerate().skip(at) {
        assert_eq!(resumed.step(&[counting_batch(s)?])?.loss, *want, "step {s}");
    }
    Ok((full, resumed))
}

/// Asserts that two lists of variables hold the same values in the same dtypes, by name.
pub fn assert_same_vars(a: &[(String, Var)], b: &[(String, Var)]) -> Result<()> {
    assert_eq!(a.len(), b.len());
    for ((n, x), (m, y)) in a.iter().zip(b) {
        assert_eq!(n, m);
        assert_eq!(x.dtype(), y.dtype(), "{n}");
        let v = |t: &Var| -> Result<Vec<f32>> {
            Ok(t.as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?)
        };
        assert_eq!(v(x)?, v(y)?, "{n}");
    }
    Ok(())
}
