#![allow(dead_code)]
//! What several integration tests train on: the tiny DeepSeekMoE with random weights and
//! counting sequences (each next token predictable).

use anyhow::Result;
use candle_core::Device;
use moe_peft_lora::TrainBatch;
use moe_peft_model::{DeepSeekMoeConfig, LoadOptions, MoeModel};

/// The tiny DeepSeekMoE (vocabulary 128, 64 positions), random weights of seed 7.
pub fn tiny_base() -> Result<MoeModel> {
    let mut cfg = DeepSeekMoeConfig::tiny(128);
    cfg.max_position_embeddings = 64;
    Ok(MoeModel::random(cfg, &LoadOptions::default(), 7)?)
}

/// Batch `step` of counting sequences: 2 rows of 12 tokens, the first 3 of each unlabelled.
pub fn counting_batch(step: usize) -> Result<TrainBatch> {
    let (b, s) = (2usize, 12usize);
    let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for row in 0..b {
        let start = (step * 37 + row * 61) % 128;
        for t in 0..s {
            let id = ((start + t) % 128) as u32;
            ids.push(id);
            mask.push(1);
            labels.push(if t < 3 { -100 } else { id as i64 });
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
