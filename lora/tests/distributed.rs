//! Data-parallel training: ranks (threads of one process) train like one process accumulating
//! all their micro-batches, and keep identical adapters; a failing rank stops them all.

use std::sync::Arc;

mod common;

use anyhow::Result;
use candle_core::{DType, Device};
use moe_peft_kernels::{Communicator, ThreadGroup};
use moe_peft_lora::{LoraModel, TrainBatch, TrainConfig, Trainer};

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
    Ok(LoraModel::new(base, common::deepseek_lora(4, 8.0, 0.1), 3)?)
}

fn lora() -> Result<LoraModel> {
    lora_with(1.0)
}

/// Rows of different lengths: the ranks see different token counts.
fn batch(k: usize) -> Result<TrainBatch> {
    let s = 10;
    common::counting_rows(k, s, 2, &|row, t| t >= s - (k + row) % 3)
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
    flat_vars(t.vars())
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
                    t.set_communicator(Arc::new(g))?;
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

/// Runs `f` on `world` ranks (threads of one group) and returns each rank's result.
fn on_ranks<T: Send>(
    world: usize,
    f: &(dyn Fn(ThreadGroup) -> Result<T> + Sync),
) -> Result<Vec<T>> {
    let group = ThreadGroup::new(world)?;
    std::thread::scope(|sc| {
        let joins: Vec<_> = group.into_iter().map(|g| sc.spawn(move || f(g))).collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("rank thread"))
            .collect()
    })
}

/// Every weight trained in bf16 with 8-bit AdamW (stochastic rounding), the state of every
/// variable of at least 64 elements in 8 bits.
fn full_ft() -> Result<(LoraModel, TrainConfig)> {
    let lm = LoraModel::full_finetune_in(common::tiny_base()?, 3, DType::BF16)?;
    let cfg = TrainConfig {
        optim: moe_peft_lora::Optim::Adamw8bit,
        min_8bit_size: 64,
        max_grad_norm: 1.0,
        ..cfg()
    };
    Ok((lm, cfg))
}

/// The optimizer state a single process loads from checkpoint `dir` (whole or sharded),
/// written whole again: the bytes of its `optimizer.safetensors`.
fn whole_state(dir: &std::path::Path) -> Result<Vec<u8>> {
    let (lm, cfg) = full_ft()?;
    let (t, _) = Trainer::resume(lm, cfg, dir)?;
    let out = tempfile::tempdir()?;
    let ck = t.save_checkpoint(out.path(), serde_json::json!({}), None)?;
    Ok(std::fs::read(ck.join(moe_peft_lora::OPTIMIZER_STATE))?)
}

#[test]
fn sharded_optimizer_state_trains_alike_and_resumes_on_any_group_size() -> Result<()> {
    let (steps, at) = (4usize, 2usize);
    let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
    // Two ranks with the whole state and two with half each: the same bits throughout.
    let mut runs = Vec::new();
    for (shard, dir) in [false, true].into_iter().zip(&dirs) {
        // Per rank: losses, final weights, which variables' state it held.
        type Run = (Vec<f64>, Vec<Vec<f32>>, Vec<bool>);
        let ranks = on_ranks(2, &|g| -> Result<Run> {
            let r = g.rank();
            let (lm, cfg) = full_ft()?;
            let mut t = Trainer::new_in_group(lm, cfg, Arc::new(g), shard)?;
            assert_eq!(t.shards_optimizer_state(), shard);
            let mut losses = Vec::new();
            for s in 0..steps {
                losses.push(t.step(&[batch(s * 2 + r)?])?.loss);
                // Sharded, every rank writes its share; else rank 0 writes it all.
                if s + 1 == at && (shard || r == 0) {
                    t.save_checkpoint(dir.path(), serde_json::json!({}), None)?;
                }
            }
            Ok((losses, flat(&t)?, t.optimizer().owned().to_vec()))
        })?;
        assert_eq!(ranks[0].0, ranks[1].0);
        assert_eq!(ranks[0].1, ranks[1].1, "the ranks' weights differ");
        if shard {
            // Each variable's state is on exactly one rank, and both ranks hold some.
            let (o0, o1) = (&ranks[0].2, &ranks[1].2);
            assert!(o0.iter().zip(o1).all(|(a, b)| a != b));
            assert!(o0.iter().any(|&x| x) && o1.iter().any(|&x| x));
        }
        runs.push(ranks.into_iter().next().expect("rank 0"));
    }
    assert_eq!(runs[0].0, runs[1].0, "losses with sharded state");
    assert_eq!(runs[0].1, runs[1].1, "weights with sharded state");
    // The sharded checkpoint holds one state file per rank, and together they are the whole
    // state: a single process loads the same from either checkpoint.
    let ck = dirs[1].path().join(format!("checkpoint-{at}"));
    let files = moe_peft_lora::optimizer_files(&ck)?;
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "optimizer-00001-of-00002.safetensors",
            "optimizer-00002-of-00002.safetensors"
        ]
    );
    let whole = whole_state(&dirs[0].path().join(format!("checkpoint-{at}")))?;
    assert_eq!(whole_state(&ck)?, whole);
    // Resumed by two sharded ranks: the uninterrupted run's losses, bit for bit.
    let resumed = on_ranks(2, &|g| -> Result<Vec<f64>> {
        let r = g.rank();
        let (lm, cfg) = full_ft()?;
        let (mut t, _) = Trainer::resume_in_group(lm, cfg, &ck, Arc::new(g), true)?;
        (at..steps)
            .map(|s| Ok(t.step(&[batch(s * 2 + r)?])?.loss))
            .collect()
    })?;
    assert_eq!(resumed[0], runs[1].0[at..]);
    // Resumed by three ranks (another split of the state) and saved again: still the same
    // state.
    let again = tempfile::tempdir()?;
    on_ranks(3, &|g| -> Result<()> {
        let (lm, cfg) = full_ft()?;
        let (t, _) = Trainer::resume_in_group(lm, cfg, &ck, Arc::new(g), true)?;
        t.save_checkpoint(again.path(), serde_json::json!({}), None)?;
        Ok(())
    })?;
    let ck3 = again.path().join(format!("checkpoint-{at}"));
    assert_eq!(moe_peft_lora::optimizer_files(&ck3)?.len(), 3);
    assert_eq!(whole_state(&ck3)?, whole);
    // A shard missing where rank 0 looks (rank 1 reads a complete copy): rank 0 stops naming
    // it, and rank 1 stops too instead of waiting for rank 0 at the first step.
    let whole_copy = tempfile::tempdir()?;
    for e in std::fs::read_dir(&ck3)? {
        let e = e?;
        std::fs::copy(e.path(), whole_copy.path().join(e.file_name()))?;
    }
    let gone = ck3.join("optimizer-00002-of-00003.safetensors");
    std::fs::remove_file(&gone)?;
    let errs = on_ranks(2, &|g| -> Result<String> {
        let (lm, cfg) = full_ft()?;
        let dir = if g.rank() == 0 {
            ck3.clone()
        } else {
            whole_copy.path().to_path_buf()
        };
        Ok(Trainer::resume_in_group(lm, cfg, &dir, Arc::new(g), true)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default())
    })?;
    assert!(errs[0].contains(&gone.display().to_string()), "{}", errs[0]);
    assert!(errs[1].contains("could not load it"), "{}", errs[1]);
    // Sharding needs an 8-bit optimizer.
    let e = on_ranks(2, &|g| -> Result<String> {
        let c = TrainConfig {
            optim: moe_peft_lora::Optim::AdamwTorch,
            ..cfg()
        };
        Ok(Trainer::new_in_group(lora()?, c, Arc::new(g), true)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default())
    })?;
    assert!(e[0].contains("8-bit"), "{}", e[0]);
    Ok(())
}

#[test]
fn a_rank_that_owns_no_variable_steps_and_saves_nothing_of_its_own() -> Result<()> {
    let (lm, cfg) = full_ft()?;
    let vars = lm.trainable_vars();
    let before = flat_vars(&vars)?;
    let opt_cfg = moe_peft_lora::AdamWConfig {
        optim: moe_peft_lora::Optim::Adamw8bit,
        min_8bit_size: cfg.min_8bit_size,
        ..Default::default()
    };
    let mut opt =
        moe_peft_lora::AdamW::new_sharded(vars.clone(), opt_cfg, vec![false; vars.len()])?;
    let grads = moe_peft_kernels::FlatGrads::new(&vars, DType::F32)?;
    for (_, v) in &vars {
        grads.add(
            v.as_tensor().id(),
            &v.as_tensor().ones_like()?.to_dtype(DType::F32)?,
        )?;
    }
    opt.step_flat(&grads, 1e-2, 1.0)?;
    assert_eq!(
        flat_vars(&vars)?,
        before,
        "a variable it does not own changed"
    );
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("optimizer-00001-of-00002.safetensors");
    opt.save(&f)?;
    let st = safetensors::SafeTensors::deserialize(&std::fs::read(&f)?)?
        .names()
        .len();
    assert_eq!(st, 3, "the maps and the step only");
    Ok(())
}

/// Every variable's values, flattened to f32.
fn flat_vars(vars: &[(String, candle_core::Var)]) -> Result<Vec<Vec<f32>>> {
    vars.iter()
        .map(|(_, v)| {
            Ok(v.as_tensor()
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?)
        })
        .collect()
}
