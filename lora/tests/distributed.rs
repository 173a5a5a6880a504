//! Data-parallel training: a group of world size 1 gives bit-identical results to no group;
//! two ranks (threads of one process) with one micro-batch each train like one process
//! accumulating both, and keep identical adapters.

use std::sync::Arc;

mod common;

use anyhow::Result;
use candle_core::{DType, Device};
use moe_peft_kernels::{Communicator, SingleProcess, ThreadGroup};
use moe_peft_lora::{LoraConfig, LoraModel, TargetModules, TrainBatch, TrainConfig, Trainer};

fn lora() -> Result<LoraModel> {
    Ok(LoraModel::new(
        common::tiny_base()?,
        LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.1,
            target_modules: Some(TargetModules::List(
                moe_peft_lora::DEEPSEEK_TARGETS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            )),
            ..Default::default()
        },
        3,
    )?)
}

fn batch(k: usize) -> Result<TrainBatch> {
    let (b, s) = (2usize, 10usize);
    let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for row in 0..b {
        let start = (k * 37 + row * 61) % 128;
        for t in 0..s {
            let id = ((start + t) % 128) as u32;
            ids.push(id);
            // Rows of different lengths: the ranks see different token counts.
            let real = t < s - (k + row) % 3;
            mask.push(real as u32);
            labels.push(if t < 2 || !real { -100 } else { id as i64 });
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

fn cfg() -> TrainConfig {
    TrainConfig {
        learning_rate: 1e-3,
        warmup_steps: 2,
        max_steps: 6,
        ..Default::default()
    }
}

fn flat(t: &Trainer) -> Result<Vec<Vec<f32>>> {
    t.vars()
        .iter()
        .map(|(_, v)| {
            Ok(v.as_tensor()
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?)
        })
        .collect()
}

#[test]
fn world_size_one_is_bit_identical_to_no_group() -> Result<()> {
    let mut plain = Trainer::new(lora()?, cfg())?;
    let mut one = Trainer::new(lora()?, cfg())?;
    one.set_communicator(Arc::new(SingleProcess));
    for s in 0..4 {
        let m = [batch(2 * s)?, batch(2 * s + 1)?];
        let (a, b) = (plain.step(&m)?, one.step(&m)?);
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {s}");
        assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits(), "step {s}");
    }
    assert_eq!(flat(&plain)?, flat(&one)?);
    Ok(())
}

/// A rank's losses, gradient norms and final weights.
type RankRun = (Vec<f64>, Vec<f64>, Vec<Vec<f32>>);

#[test]
fn two_ranks_train_like_one_process_accumulating_both() -> Result<()> {
    let steps = 4;
    // One process, accumulation 2: micro-batches 2s (rank 0's) and 2s+1 (rank 1's).
    let mut single = Trainer::new(lora()?, cfg())?;
    let mut want = Vec::new();
    for s in 0..steps {
        want.push(single.step(&[batch(2 * s)?, batch(2 * s + 1)?])?);
    }
    let group = ThreadGroup::new(2)?;
    let ranks: Vec<RankRun> = std::thread::scope(|sc| {
        let joins: Vec<_> = group
            .into_iter()
            .map(|g| {
                sc.spawn(move || -> Result<RankRun> {
                    let rank = g.rank();
                    let mut t = Trainer::new(lora()?, cfg())?;
                    t.set_communicator(Arc::new(g));
                    let (mut losses, mut norms) = (Vec::new(), Vec::new());
                    for s in 0..steps {
                        let m = t.step(&[batch(2 * s + rank)?])?;
                        losses.push(m.loss);
                        norms.push(m.grad_norm);
                    }
                    Ok((losses, norms, flat(&t)?))
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("rank thread"))
            .collect::<Result<Vec<_>>>()
    })?;
    // The ranks agree bit for bit.
    assert_eq!(ranks[0], ranks[1]);
    // And match the accumulating process up to the order of the sums (f32 gradients summed
    // per rank, then across ranks, instead of in one running sum).
    let (losses, norms, params) = &ranks[0];
    for (s, w) in want.iter().enumerate() {
        assert!(
            (losses[s] - w.loss).abs() <= 1e-6 * w.loss.abs(),
            "step {s}: loss {} vs {}",
            losses[s],
            w.loss
        );
        assert!(
            (norms[s] - w.grad_norm).abs() <= 1e-5 * w.grad_norm,
            "step {s}: grad norm {} vs {}",
            norms[s],
            w.grad_norm
        );
    }
    let mut worst = 0f32;
    for (a, b) in params.iter().zip(flat(&single)?) {
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max((x - y).abs());
        }
    }
    eprintln!("two ranks vs one accumulating process: largest weight difference {worst:e}");
    assert!(worst <= 1e-6, "weights differ by {worst}");
    Ok(())
}
