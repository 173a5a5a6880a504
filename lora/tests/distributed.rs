//! Data-parallel training: ranks (threads of one process) train like one process accumulating
//! all their micro-batches, and keep identical adapters; a failing rank stops them all.

use std::sync::Arc;

mod common;

use anyhow::Result;
use candle_core::{DType, Device};
use moe_peft_kernels::{Communicator, ThreadGroup};
use moe_peft_lora::{LoraConfig, LoraModel, TargetModules, TrainBatch, TrainConfig, Trainer};

/// The tiny model with adapters; `aux_scale` multiplies its balancing-loss weight.
fn lora_with(aux_scale: f64) -> Result<LoraModel> {
    let mut base = common::tiny_base()?;
    let mut cfg = match base.config().clone() {
        moe_peft_model::ModelConfig::DeepSeek(c) => c,
        other => panic!("{:?}", other.family()),
    };
    if aux_scale != 1.0 {
        cfg.aux_loss_alpha *= aux_scale;
        base = moe_peft_model::MoeModel::random(cfg, &moe_peft_model::LoadOptions::default(), 7)?;
    }
    Ok(LoraModel::new(
        base,
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

fn lora() -> Result<LoraModel> {
    lora_with(1.0)
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

/// A rank's losses, gradient norms and final weights.
type RankRun = (Vec<f64>, Vec<f64>, Vec<Vec<f32>>);

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

/// Runs `world` ranks as threads, rank `r` stepping on `micro(step, r)` each step.
fn run_group(
    world: usize,
    steps: usize,
    micro: &(dyn Fn(usize, usize) -> Result<Vec<TrainBatch>> + Sync),
) -> Result<Vec<Result<RankRun>>> {
    let group = ThreadGroup::new(world)?;
    Ok(std::thread::scope(|sc| {
        let joins: Vec<_> = group
            .into_iter()
            .map(|g| {
                sc.spawn(move || -> Result<RankRun> {
                    let rank = g.rank();
                    let mut t = Trainer::new(lora()?, cfg())?;
                    t.set_communicator(Arc::new(g));
                    let (mut losses, mut norms) = (Vec::new(), Vec::new());
                    for s in 0..steps {
                        let m = t.step(&micro(s, rank)?)?;
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
            .collect()
    }))
}

/// `world` ranks of `per_rank` micro-batches each against one process accumulating all of
/// them (its balancing loss weighted 1/world, as the group weighs it).
fn group_equals_one_accumulating_process(world: usize, per_rank: usize) -> Result<()> {
    let steps = 3;
    let n = world * per_rank;
    let mut single = Trainer::new(lora_with(1.0 / world as f64)?, cfg())?;
    let mut want = Vec::new();
    for s in 0..steps {
        let m: Vec<TrainBatch> = (0..n).map(|j| batch(s * n + j)).collect::<Result<_>>()?;
        want.push(single.step(&m)?);
    }
    // Rank r's i-th micro-batch is the (i·world + r)-th of the process's step.
    let ranks = run_group(world, steps, &|s, r| {
        (0..per_rank)
            .map(|i| batch(s * n + i * world + r))
            .collect()
    })?
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    for r in &ranks[1..] {
        assert_eq!(r, &ranks[0], "the ranks disagree");
    }
    // Equal up to the order of the sums (f32 gradients summed per rank, then across ranks).
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
    eprintln!(
        "{world} ranks × {per_rank} vs one process × {n}: largest weight difference {worst:e}"
    );
    assert!(worst <= 1e-6, "weights differ by {worst}");
    Ok(())
}

#[test]
fn two_ranks_train_like_one_process_accumulating_both() -> Result<()> {
    group_equals_one_accumulating_process(2, 1)
}

#[test]
fn ranks_with_accumulation_map_onto_one_process() -> Result<()> {
    group_equals_one_accumulating_process(2, 2)?;
    group_equals_one_accumulating_process(3, 2)
}

#[test]
fn a_failing_rank_stops_every_rank_without_a_hang() -> Result<()> {
    let out = run_group(2, 1, &|s, r| {
        let mut b = batch(s + r)?;
        if r == 1 {
            // A label outside the vocabulary: rank 1's loss fails.
            let l: Vec<i64> = vec![500; 20];
            b.labels = candle_core::Tensor::from_vec(l, (2, 10), &Device::Cpu)?;
        }
        Ok(vec![b])
    })?;
    let e1 = out[1].as_ref().unwrap_err().to_string();
    assert!(e1.contains("500"), "{e1}");
    let e0 = out[0].as_ref().unwrap_err().to_string();
    assert!(e0.contains("other rank"), "{e0}");
    Ok(())
}
