//! bf16 QLoRA training agrees with f32 training from the same start (GPU only: candle's CPU
//! matmul has no bf16 kernel). Runs when built with `--features cuda` on a machine with a GPU;
//! with `MOE_PEFT_REQUIRE_CUDA=1` a missing GPU is a failure instead of a skip.
//!
//! Setup: a small DeepSeekMoE (4 layers, dense layer 0, 16 routed experts top-4 + 2 shared,
//! hidden 128, vocabulary 512) written as a bf16 checkpoint, so both runs start from exactly the
//! same weights and NF4 codes; LoRA r=8/α=16 on all seven projection types of every expert, no
//! dropout; AdamW lr 2e-3 with 10 warm-up steps and a cosine decay, clipping 1.0; 300 steps of
//! 8×64 tokens of a learnable sequence task (arithmetic progressions mod 512, each with its own
//! stride). The f32 run computes in f32 with f32 NF4 dequantization; the bf16 run rounds every
//! activation, dequantized weight and adapter cast to bf16 (moments and gradients stay f32).
//!
//! Bounds, from bf16's unit roundoff u = 2⁻⁹ ≈ 1.95e-3: a forward pass rounds each value at
//! about 40 points (4 layers × ~10 ops), which gives a relative error of about u·√40 ≈ 1.2% in the
//! logits if the roundings are independent. The loss of one step is the mean of thousands of
//! token losses, so its difference is much smaller than that, but the two trajectories then
//! drift apart through different updates. We require (1) every step's loss within 3% (≈ 15u) of
//! the f32 loss, (2) the mean loss of the last 20 steps within 1% (≈ 5u), since averaging removes
//! per-step noise, (3) both runs lower the loss by the same amount to within 5% of the drop, and
//! (4) the adapters point the same way: the change of every LoRA tensor from its start has a
//! cosine similarity of at least 0.8 between the runs, and at least 0.95 in the median.
#![cfg(feature = "cuda")]

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use moe_peft::lora::{
    LoraConfig, LoraModel, Schedule, TargetModules, TrainBatch, TrainConfig, Trainer,
};
use moe_peft::model::random::{write_random_checkpoint, RandomCheckpointOptions};
use moe_peft::model::{DeepSeekMoeConfig, LoadOptions, MoeModel};
use moe_peft::quant::QuantPolicy;

fn gpu() -> Option<Device> {
    moe_peft::kernels::cuda_device_or_skip()
}

const VOCAB: usize = 512;
const STEPS: usize = 300;
const ROWS: usize = 8;
const SEQ: usize = 64;

fn config() -> DeepSeekMoeConfig {
    let mut c = DeepSeekMoeConfig::tiny(VOCAB);
    c.hidden_size = 128;
    c.intermediate_size = 256;
    c.moe_intermediate_size = 64;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 4;
    c.num_key_value_heads = Some(4);
    c.n_routed_experts = Some(16);
    c.num_experts_per_tok = Some(4);
    c.n_shared_experts = Some(2);
    c.initializer_range = 0.05;
    c
}

/// Batch `step`: rows `a, a+d, a+2d, …` mod VOCAB with a per-row stride `d` in 1..=7.
fn batch(step: usize, dev: &Device) -> Result<TrainBatch> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (step as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut ids = Vec::with_capacity(ROWS * SEQ);
    for _ in 0..ROWS {
        let a = next() % VOCAB as u64;
        let d = 1 + next() % 7;
        for i in 0..SEQ as u64 {
            ids.push(((a + i * d) % VOCAB as u64) as u32);
        }
    }
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Ok(TrainBatch::from_host(
        &ids,
        &vec![1; ROWS * SEQ],
        &labels,
        ROWS,
        SEQ,
        dev,
    )?)
}

fn trainer(dir: &std::path::Path, dev: &Device, dtype: DType) -> Result<Trainer> {
    let base = MoeModel::from_pretrained(
        dir,
        &LoadOptions {
            dtype,
            device: dev.clone(),
            quant: QuantPolicy::qlora(),
        },
    )?;
    let lcfg = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        target_modules: Some(TargetModules::List(
            moe_peft::lora::DEEPSEEK_TARGETS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )),
        ..Default::default()
    };
    let lm = LoraModel::new(base, lcfg, 7)?;
    Ok(Trainer::new(
        lm,
        TrainConfig {
            learning_rate: 2e-3,
            warmup_steps: 10,
            lr_scheduler_type: Schedule::Cosine,
            max_steps: STEPS,
            max_grad_norm: 1.0,
            gradient_checkpointing: true,
            ..Default::default()
        },
    )?)
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

#[test]
fn bf16_training_follows_f32_training() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let dir = tempfile::tempdir()?;
    write_random_checkpoint(
        &config(),
        dir.path(),
        &RandomCheckpointOptions {
            seed: 11,
            dtype: DType::BF16,
            ..Default::default()
        },
    )?;
    let mut t32 = trainer(dir.path(), &dev, DType::F32)?;
    let mut t16 = trainer(dir.path(), &dev, DType::BF16)?;
    // The same adapter start (f32 variables in both runs).
    for ((n, a), (_, b)) in t32.vars().iter().zip(t16.vars()) {
        b.set(a.as_tensor())
            .map_err(|e| anyhow::anyhow!("{n}: {e}"))?;
    }
    let start: Vec<Vec<f32>> = t32
        .vars()
        .iter()
        .map(|(_, v)| host(v.as_tensor()))
        .collect::<Result<_>>()?;
    let (mut l32, mut l16) = (Vec::new(), Vec::new());
    for step in 0..STEPS {
        let b = batch(step, &dev)?;
        l32.push(t32.step(std::slice::from_ref(&b))?.loss);
        l16.push(t16.step(&[b])?.loss);
    }
    let mut worst_rel: f64 = 0.0;
    for (i, (a, b)) in l32.iter().zip(&l16).enumerate() {
        let rel = (a - b).abs() / a.abs();
        worst_rel = worst_rel.max(rel);
        if i % 25 == 0 || i + 1 == STEPS {
            println!("step {:>3}: f32 {a:.5}  bf16 {b:.5}  rel {rel:.2e}", i + 1);
        }
    }
    let tail = |v: &[f64]| v[v.len() - 20..].iter().sum::<f64>() / 20.0;
    let (e32, e16) = (tail(&l32), tail(&l16));
    let end_rel = (e32 - e16).abs() / e32;
    let (d32, d16) = (l32[0] - e32, l16[0] - e16);
    let drop_rel = (d32 - d16).abs() / d32;
    let mut cos = Vec::new();
    for (i, ((n, a), (_, b))) in t32.vars().iter().zip(t16.vars()).enumerate() {
        let (a, b) = (host(a.as_tensor())?, host(b.as_tensor())?);
        let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
        for ((x, y), s) in a.iter().zip(&b).zip(&start[i]) {
            let (dx, dy) = ((x - s) as f64, (y - s) as f64);
            dot += dx * dy;
            na += dx * dx;
            nb += dy * dy;
        }
        let c = dot / (na.sqrt() * nb.sqrt()).max(1e-30);
        cos.push((c, n.clone()));
    }
    cos.sort_by(|a, b| a.0.total_cmp(&b.0));
    let median = cos[cos.len() / 2].0;
    let mean = cos.iter().map(|c| c.0).sum::<f64>() / cos.len() as f64;
    println!(
        "loss: worst per-step rel diff {worst_rel:.3e}; last-20 mean f32 {e32:.5} bf16 {e16:.5} (rel {end_rel:.3e}); drop f32 {d32:.4} bf16 {d16:.4} (rel {drop_rel:.3e})"
    );
    println!(
        "adapter change cosine over {} tensors: min {:.4} ({}), median {median:.4}, mean {mean:.4}",
        cos.len(),
        cos[0].0,
        cos[0].1
    );
    assert!(d32 > 1.0, "the f32 run must learn (loss drop {d32})");
    assert!(worst_rel <= 0.03, "per-step loss rel diff {worst_rel}");
    assert!(end_rel <= 0.01, "final loss rel diff {end_rel}");
    assert!(drop_rel <= 0.05, "loss drop rel diff {drop_rel}");
    assert!(cos[0].0 >= 0.8, "min cosine {} at {}", cos[0].0, cos[0].1);
    assert!(median >= 0.95, "median cosine {median}");
    Ok(())
}
