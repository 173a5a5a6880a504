//! Training on a tiny random DeepSeekMoE: the loss falls; a run resumed from a mid-run
//! checkpoint reproduces the uninterrupted run's losses exactly; saves are atomic and
//! round-trip; bad adapters and configs are refused with clear errors.

mod common;

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device};
use moe_peft_lora::{
    latest_checkpoint, list_checkpoints, Error, LoraConfig, LoraModel, Schedule, TargetModules,
    TrainBatch, TrainConfig, Trainer,
};
use moe_peft_model::{DeepSeekMoeConfig, LoadOptions, MoeModel};

use common::tiny_base as base;

fn lora_cfg(dropout: f64) -> LoraConfig {
    LoraConfig {
        modules_to_save: Some(vec!["lm_head".into()]),
        ..common::deepseek_lora(8, 16.0, dropout)
    }
}

/// Counting sequences (`t, t+1, …` mod vocab): each next token is predictable. The first
/// three positions are prompt (-100); row 1 is right-padded by 2.
fn batch(step: usize) -> Result<TrainBatch> {
    common::counting_rows(step, 12, 3, &|row, t| row == 1 && t >= 10)
}

fn train_cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        learning_rate: 3e-3,
        lr_scheduler_type: Schedule::Cosine,
        warmup_steps: 2,
        max_steps: steps,
        gradient_accumulation_steps: 2,
        max_grad_norm: 1.0,
        ..Default::default()
    }
}

fn run(trainer: &mut Trainer, from: usize, to: usize) -> Result<Vec<f64>> {
    let mut losses = Vec::new();
    for step in from..to {
        let m = trainer.step(&[batch(2 * step)?, batch(2 * step + 1)?])?;
        losses.push(m.loss);
    }
    Ok(losses)
}

#[test]
fn loss_falls_clearly() -> Result<()> {
    let lm = LoraModel::new(base()?, lora_cfg(0.0), 1)?;
    let mut t = Trainer::new(
        lm,
        TrainConfig {
            learning_rate: 1e-2,
            ..train_cfg(40)
        },
    )?;
    let losses = run(&mut t, 0, 40)?;
    let first = losses[..3].iter().sum::<f64>() / 3.0;
    let last = losses[37..].iter().sum::<f64>() / 3.0;
    assert!(
        last < 0.6 * first,
        "loss {first:.3} → {last:.3}: {losses:?}"
    );
    Ok(())
}

#[test]
fn resume_reproduces_the_uninterrupted_run_exactly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut full = Trainer::new(LoraModel::new(base()?, lora_cfg(0.1), 3)?, train_cfg(8))?;
    let mut losses = run(&mut full, 0, 4)?;
    let ck = full.save_checkpoint(dir.path(), serde_json::json!({"next_step": 4}), Some(2))?;
    losses.extend(run(&mut full, 4, 8)?);

    let (mut resumed, extra) = Trainer::resume(
        LoraModel::new(base()?, lora_cfg(0.1), 3)?,
        train_cfg(8),
        &ck,
    )?;
    assert_eq!(extra["next_step"], 4);
    assert_eq!(resumed.global_step(), 4);
    let tail = run(&mut resumed, 4, 8)?;
    assert_eq!(tail, losses[4..].to_vec(), "resumed losses differ");
    // The adapters end identical too.
    for ((n, a), (_, b)) in full.vars().iter().zip(resumed.vars()) {
        let d = (a.as_tensor() - b.as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "{n}");
    }
    Ok(())
}

#[test]
fn checkpoints_rotate_and_a_failed_save_leaves_the_previous_intact() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut t = Trainer::new(LoraModel::new(base()?, lora_cfg(0.0), 3)?, train_cfg(6))?;
    for step in 0..3 {
        run(&mut t, step, step + 1)?;
        t.save_checkpoint(dir.path(), serde_json::json!({}), Some(2))?;
    }
    let kept: Vec<usize> = list_checkpoints(dir.path())
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(kept, vec![2, 3]);
    run(&mut t, 3, 4)?;
    let err = t
        .save_checkpoint_with(dir.path(), serde_json::json!({}), Some(2), &|_| {
            Err(Error::Checkpoint {
                path: "test".into(),
                reason: "killed between write and rename".into(),
            })
        })
        .unwrap_err();
    assert!(err.to_string().contains("killed"));
    let latest = latest_checkpoint(dir.path()).unwrap();
    assert!(latest.ends_with("checkpoint-3"), "{latest:?}");
    // The surviving checkpoint still loads.
    let (r, _) = Trainer::resume(
        LoraModel::new(base()?, lora_cfg(0.0), 3)?,
        train_cfg(6),
        &latest,
    )?;
    assert_eq!(r.global_step(), 3);
    Ok(())
}

fn tensors(dir: &Path) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
    Ok(candle_core::safetensors::load(
        dir.join("adapter_model.safetensors"),
        &Device::Cpu,
    )?)
}

#[test]
fn save_load_round_trip_is_identical_and_peft_named() -> Result<()> {
    let mut t = Trainer::new(LoraModel::new(base()?, lora_cfg(0.0), 5)?, train_cfg(3))?;
    run(&mut t, 0, 2)?;
    let lm = t.into_lora();
    let a = tempfile::tempdir()?;
    lm.save_adapter(a.path(), DType::F32)?;
    let saved = tensors(a.path())?;
    assert_eq!(saved.len(), 69 * 2 + 1);
    assert!(
        saved.contains_key("base_model.model.model.layers.1.mlp.experts.7.down_proj.lora_B.weight")
    );
    assert!(saved.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    assert!(saved.contains_key("base_model.model.lm_head.weight"));
    // Deterministic bytes.
    let b = tempfile::tempdir()?;
    lm.save_adapter(b.path(), DType::F32)?;
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        assert_eq!(
            std::fs::read(a.path().join(f))?,
            std::fs::read(b.path().join(f))?,
            "{f}"
        );
    }
    let loaded = LoraModel::from_pretrained(base()?, a.path())?;
    for ((k1, v1), (k2, v2)) in lm.trainable_vars().iter().zip(loaded.trainable_vars()) {
        assert_eq!(k1, &k2);
        let d = (v1.as_tensor() - v2.as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "{k1}");
    }
    Ok(())
}

#[test]
fn bad_adapters_and_configs_are_refused_clearly() -> Result<()> {
    // Unknown target module: the error lists what exists.
    let mut cfg = lora_cfg(0.0);
    cfg.target_modules = Some(TargetModules::List(vec![
        "q_proj".into(),
        "qkv_proj".into(),
    ]));
    let e = LoraModel::new(base()?, cfg, 0).unwrap_err().to_string();
    assert!(
        e.contains("qkv_proj") && e.contains("gate_proj") && e.contains("all-linear"),
        "{e}"
    );
    // r = 0.
    let mut cfg = lora_cfg(0.0);
    cfg.r = 0;
    assert!(LoraModel::new(base()?, cfg, 0)
        .unwrap_err()
        .to_string()
        .contains("`r`"));
    // An adapter whose shapes do not fit: saved at r=8, config edited to r=4.
    let dir = tempfile::tempdir()?;
    LoraModel::new(base()?, lora_cfg(0.0), 0)?.save_adapter(dir.path(), DType::F32)?;
    let p = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&p)?.replace("\"r\": 8", "\"r\": 4");
    std::fs::write(&p, text)?;
    let e = LoraModel::from_pretrained(base()?, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_A.weight") && e.contains("expected shape [4,") && e.contains("found [8,"),
        "{e}"
    );
    // An adapter for a different model width.
    let mut wide = DeepSeekMoeConfig::tiny(128);
    wide.hidden_size = 96;
    wide.num_attention_heads = 6;
    wide.num_key_value_heads = Some(6);
    let wide = MoeModel::random(wide, &LoadOptions::default(), 1)?;
    std::fs::write(
        &p,
        std::fs::read_to_string(&p)?.replace("\"r\": 4", "\"r\": 8"),
    )?;
    let e = LoraModel::from_pretrained(wide, dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected shape"), "{e}");
    // Unmerge without merge.
    let lm = LoraModel::new(base()?, lora_cfg(0.0), 0)?;
    assert!(lm.unmerge().unwrap_err().to_string().contains("not merged"));
    Ok(())
}

#[test]
fn full_finetune_trains_every_weight_and_resumes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let lm = LoraModel::full_finetune(base()?, 0)?;
    let n_params = base()?.arch().num_parameters();
    assert_eq!(lm.num_trainable_parameters(), n_params);
    let cfg = TrainConfig {
        learning_rate: 1e-3,
        ..train_cfg(6)
    };
    let mut t = Trainer::new(lm, cfg.clone())?;
    let mut losses = run(&mut t, 0, 3)?;
    let ck = t.save_checkpoint(dir.path(), serde_json::json!({}), None)?;
    assert!(ck.join("model.safetensors").exists() && ck.join("config.json").exists());
    losses.extend(run(&mut t, 3, 6)?);
    assert!(losses[5] < losses[0], "{losses:?}");
    let (mut r, _) = Trainer::resume(LoraModel::full_finetune(base()?, 0)?, cfg, &ck)?;
    assert_eq!(run(&mut r, 3, 6)?, losses[3..].to_vec());
    // The saved checkpoint is a loadable HF model.
    let m = MoeModel::from_pretrained(&ck, &LoadOptions::default())?;
    assert_eq!(m.arch().num_parameters(), n_params);
    Ok(())
}

#[test]
fn fused_experts_match_autograd_with_dropout_and_checkpointing() -> Result<()> {
    // Uniform adapters take the grouped-GEMM path; a rank override on one expert forces the
    // per-expert loop.
    for (ckpt, mixed_ranks) in [(true, false), (false, false), (true, true)] {
        let cfg = TrainConfig {
            gradient_checkpointing: ckpt,
            ..train_cfg(4)
        };
        let b = batch(3)?;
        let mut grads = Vec::new();
        for fused in [true, false] {
            let mut lcfg = lora_cfg(0.3);
            if mixed_ranks {
                lcfg.rank_pattern.insert("experts.1.up_proj".into(), 4);
            }
            let mut lm = LoraModel::new(base()?, lcfg, 11)?;
            // Non-zero B so every path of the adapter backward matters.
            for (k, (_, l)) in lm.adapters().iter().enumerate() {
                let b = l.lora_b();
                let n = b.elem_count();
                let v: Vec<f32> = (0..n)
                    .map(|i| (((i * 7919 + k * 104729) % 1000) as f32 / 1000.0 - 0.5) * 0.1)
                    .collect();
                b.set(&candle_core::Tensor::from_vec(v, b.shape(), &Device::Cpu)?)?;
            }
            lm.set_fused_experts(fused);
            let t = Trainer::new(lm, cfg.clone())?;
            let mg = t.micro_gradients(&b, 0.5)?;
            grads.push((mg.loss, mg.grads, t.vars().to_vec()));
        }
        assert_eq!(grads[0].0, grads[1].0, "loss");
        for (i, (name, _)) in grads[0].2.iter().enumerate() {
            let (a, b) = (grads[0].1[i].as_ref(), grads[1].1[i].as_ref());
            match (a, b) {
                (Some(a), Some(b)) => {
                    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    let m = b.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(
                        d <= 1e-6 + 1e-5 * m,
                        "{name}: fused differs by {d} (max {m})"
                    );
                }
                (None, None) => {}
                _ => panic!("{name}: gradient present in one path only"),
            }
        }
    }
    Ok(())
}

/// Sets every adapter's B to fixed non-zero values, so the gradients of A are non-zero too.
fn nonzero_b(lm: &LoraModel) -> Result<()> {
    for (k, (_, l)) in lm.adapters().iter().enumerate() {
        let b = l.lora_b();
        let n = b.elem_count();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i * 7919 + k * 104729) % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect();
        b.set(&candle_core::Tensor::from_vec(v, b.shape(), &Device::Cpu)?)?;
    }
    Ok(())
}

/// `loss = CE + Σ aux` of `b` through the model's public forward (training mode, dropout of
/// micro-step 0).
fn public_loss(lm: &LoraModel, b: &TrainBatch) -> Result<candle_core::Tensor> {
    lm.dropout_state().set_step(0);
    let (out, aux) = lm
        .model()
        .loss(&b.input_ids, Some(&b.attention_mask), &b.labels, true)?;
    Ok(aux.into_iter().try_fold(out.loss, |l, a| l + a)?)
}

#[test]
fn public_backward_gives_every_trainable_variable_the_trainers_gradient() -> Result<()> {
    // A custom training loop's one gradient path: every adapter (attention, dense MLP, shared
    // and routed experts) and the saved lm_head get a non-zero gradient, the one the trainer
    // computes. On the routed experts it comes from the fused path's hand-written backward.
    let b = batch(0)?;
    let want = {
        let lm = LoraModel::new(base()?, lora_cfg(0.1), 5)?;
        nonzero_b(&lm)?;
        let cfg = TrainConfig {
            gradient_checkpointing: false,
            ..train_cfg(1)
        };
        let t = Trainer::new(lm, cfg)?;
        let mg = t.micro_gradients(&b, 1.0)?;
        let names: Vec<String> = t.vars().iter().map(|(n, _)| n.clone()).collect();
        names.into_iter().zip(mg.grads).collect::<Vec<_>>()
    };
    let lm = LoraModel::new(base()?, lora_cfg(0.1), 5)?;
    nonzero_b(&lm)?;
    let loss = public_loss(&lm, &b)?;
    let gs = lm.backward(&loss)?;
    let got = lm.gradients(&gs);
    assert_eq!(got.len(), want.len());
    let routed = got
        .iter()
        .filter(|(n, _)| n.contains(".mlp.experts."))
        .count();
    let shared = got
        .iter()
        .filter(|(n, _)| n.contains("shared_experts"))
        .count();
    assert!(
        routed >= 2 * 3 * 8,
        "{routed} routed-expert adapter tensors"
    );
    assert!(shared > 0 && got.iter().any(|(n, _)| n.contains("lm_head")));
    for ((name, g), (wname, w)) in got.iter().zip(&want) {
        assert_eq!(name, wname);
        let g = g
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no gradient through LoraModel::backward"));
        let w = w
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no gradient from the trainer"));
        let m = w.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(m > 0.0, "{name}: zero gradient");
        let d = (g - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d <= 1e-6 + 1e-5 * m, "{name}: differs by {d} (max {m})");
    }
    Ok(())
}

#[test]
fn bare_backward_through_routed_adapters_is_refused_and_keeps_nothing() -> Result<()> {
    // The fused experts' adapter gradients cannot ride candle's GradStore: a plain
    // `loss.backward()` must fail loudly (it used to return a store without them), and
    // the refused pass must not leave gradients behind for the next `backward`.
    let b = batch(1)?;
    let lm = LoraModel::new(base()?, lora_cfg(0.0), 3)?;
    nonzero_b(&lm)?;
    let first = lm.backward(&public_loss(&lm, &b)?)?;
    let err = public_loss(&lm, &b)?
        .backward()
        .expect_err("a bare backward through routed-expert adapters must fail")
        .to_string();
    assert!(err.contains("LoraModel::backward"), "{err}");
    let second = lm.backward(&public_loss(&lm, &b)?)?;
    for ((name, a), (_, c)) in lm.gradients(&first).iter().zip(lm.gradients(&second)) {
        let (a, c) = (a.as_ref().unwrap(), c.as_ref().unwrap());
        let d = (a - c)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(
            d, 0.0,
            "{name}: the refused pass changed the next gradients"
        );
    }
    Ok(())
}

/// Host copies of every trainable variable, in the trainer's order.
fn values(vars: &[(String, candle_core::Var)]) -> Result<Vec<Vec<f32>>> {
    vars.iter()
        .map(|(_, v)| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?))
        .collect()
}

#[test]
fn trainer_clips_as_torch_clip_grad_norm() -> Result<()> {
    // torch.nn.utils.clip_grad_norm_(params, max_norm): total = sqrt(Σ g²) over every
    // gradient, coefficient max_norm / (total + 1e-6) applied when below 1. The trainer folds
    // it into its update; here each step is replayed by hand: the gradients of the same
    // micro-batch, their norm in f64, torch's coefficient, and a separate AdamW fed the
    // clipped gradients. Max norms: clipping every step, never, and off (0).
    for max_norm in [0.05, 1e6, 0.0] {
        let lm = LoraModel::new(base()?, lora_cfg(0.0), 21)?;
        nonzero_b(&lm)?;
        let cfg = TrainConfig {
            gradient_accumulation_steps: 1,
            max_grad_norm: max_norm,
            ..train_cfg(3)
        };
        let mut t = Trainer::new(lm, cfg)?;
        // The replica: its own variables with the same start values.
        let replica: Vec<(String, candle_core::Var)> = t
            .vars()
            .iter()
            .map(|(n, v)| {
                Ok((
                    n.clone(),
                    candle_core::Var::from_tensor(&v.as_tensor().copy()?)?,
                ))
            })
            .collect::<Result<_>>()?;
        let mut opt = moe_peft_lora::AdamW::new(replica.clone(), Default::default())?;
        let mut clipped = 0;
        for step in 0..3 {
            let b = batch(step)?;
            // An expert that got no tokens has no gradient; the trainer steps it with zeros,
            // as PyTorch does for the reference's experts (their .grad is a zero tensor).
            let grads: Vec<Option<candle_core::Tensor>> = t
                .micro_gradients(&b, 1.0)?
                .grads
                .into_iter()
                .zip(t.vars())
                .map(|(g, (_, v))| match g {
                    Some(g) => Ok(Some(g)),
                    None => Ok(Some(v.as_tensor().zeros_like()?)),
                })
                .collect::<Result<_>>()?;
            let mut sq = 0.0f64;
            for g in grads.iter().flatten() {
                sq += g
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|&x| (x as f64) * (x as f64))
                    .sum::<f64>();
            }
            let norm = sq.sqrt();
            let coef = if max_norm > 0.0 && max_norm / (norm + 1e-6) < 1.0 {
                clipped += 1;
                max_norm / (norm + 1e-6)
            } else {
                1.0
            };
            let lr = t.config().lr_at(step);
            let m = t.step(&[b])?;
            assert!(
                (m.grad_norm - norm).abs() <= 1e-9 * norm,
                "step {step}: norm {} vs {norm}",
                m.grad_norm
            );
            opt.step_scaled(&grads, lr, coef)?;
            for (i, (a, r)) in values(t.vars())?.iter().zip(values(&replica)?).enumerate() {
                let d = a
                    .iter()
                    .zip(&r)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                let scale = r.iter().map(|x| x.abs()).fold(0f32, f32::max);
                assert!(
                    d <= 1e-6 * scale.max(1e-3),
                    "max_norm {max_norm}, step {step}, {}: off by {d}",
                    t.vars()[i].0
                );
            }
        }
        let want = if max_norm == 0.05 { 3 } else { 0 };
        assert_eq!(clipped, want, "max_norm {max_norm}: steps clipped");
    }
    Ok(())
}

#[test]
fn non_finite_loss_stops_before_the_update() -> Result<()> {
    let lm = LoraModel::new(base()?, lora_cfg(0.0), 4)?;
    let mut t = Trainer::new(lm, train_cfg(3))?;
    t.step(&[batch(0)?])?;
    // A NaN in the fully trained lm_head makes every logit, so the loss, NaN.
    let (_, head) = t
        .vars()
        .iter()
        .find(|(n, _)| n.contains("lm_head"))
        .cloned()
        .expect("lm_head is trained");
    let mut w = head.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    w[0] = f32::NAN;
    head.set(&candle_core::Tensor::from_vec(
        w,
        head.shape(),
        &Device::Cpu,
    )?)?;
    let before = values(t.vars())?;
    let err = t
        .step(&[batch(1)?])
        .expect_err("a NaN loss must stop training");
    assert!(
        matches!(
            err,
            Error::NonFinite {
                what: "loss",
                step: 2
            }
        ),
        "{err}"
    );
    assert_eq!(t.global_step(), 1, "no step was counted");
    let after = values(t.vars())?;
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{} changed by a refused step", t.vars()[i].0);
    }
    Ok(())
}

#[test]
fn keeping_activations_of_some_layers_gives_the_same_gradient_bits() -> Result<()> {
    // Recomputing a layer in backward runs the same ops on the same input (dropout masks
    // included), so keeping the last K layers' graphs instead changes nothing: checked for every
    // K, with dropout, on the fused expert path, over three optimizer steps.
    let b = batch(3)?;
    let run_with = |keep: usize| -> Result<(Vec<f64>, Vec<Vec<f32>>)> {
        let cfg = TrainConfig {
            gradient_checkpointing: true,
            keep_activations_layers: keep,
            learning_rate: 1e-2,
            ..train_cfg(3)
        };
        let lm = LoraModel::new(base()?, lora_cfg(0.3), 11)?;
        nonzero_b(&lm)?;
        let mut t = Trainer::new(lm, cfg)?;
        let mut losses = Vec::new();
        for _ in 0..3 {
            losses.push(t.step(std::slice::from_ref(&b))?.loss);
        }
        let params = t
            .vars()
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all()?.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((losses, params))
    };
    let n_layers = base()?.arch().num_hidden_layers;
    let reference = run_with(0)?;
    for keep in 1..=n_layers + 1 {
        let got = run_with(keep)?;
        assert_eq!(got.0, reference.0, "losses with {keep} layers kept");
        assert!(
            got.1 == reference.1,
            "parameters differ with {keep} layers kept"
        );
    }
    Ok(())
}

#[test]
fn invalid_settings_name_their_field() {
    let cases: [(&str, TrainConfig); 4] = [
        (
            "adam_beta1",
            TrainConfig {
                adam_beta1: 1.0,
                ..TrainConfig::default()
            },
        ),
        (
            "weight_decay",
            TrainConfig {
                weight_decay: f64::NAN,
                ..TrainConfig::default()
            },
        ),
        (
            "max_grad_norm",
            TrainConfig {
                max_grad_norm: -1.0,
                ..TrainConfig::default()
            },
        ),
        (
            "warmup_ratio",
            TrainConfig {
                warmup_ratio: 2.0,
                ..TrainConfig::default()
            },
        ),
    ];
    for (want, cfg) in cases {
        match cfg.validate() {
            Err(moe_peft_lora::Error::InvalidTrainSetting { field, .. }) => assert_eq!(field, want),
            other => panic!("{want}: {other:?}"),
        }
    }
    assert!(TrainConfig::default().validate().is_ok());
}
