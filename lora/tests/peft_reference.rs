//! Against real PEFT 0.13.2 output on the tiny DeepSeekMoE (fixtures/lora, fixtures/nf4):
//! loading the adapter gives PEFT's logits and loss; our LoRA gradients match PEFT's (with the
//! aux-loss gradient, and CE only), with and without gradient checkpointing; merging matches
//! `merge_and_unload`; QLoRA on the bitsandbytes NF4 base matches too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use moe_peft_lora::{LoraModel, TrainBatch, TrainConfig, Trainer};
use moe_peft_model::{causal_lm_loss, LoadOptions, MoeModel};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn load(p: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(p, &Device::Cpu)?)
}

fn batch() -> Result<TrainBatch> {
    let r = load(&fixtures().join("forward.safetensors"))?;
    Ok(TrainBatch {
        input_ids: r["input_ids"].to_dtype(DType::U32)?,
        attention_mask: r["attention_mask"].to_dtype(DType::U32)?,
        labels: r["labels"].clone(),
        packed: false,
    })
}

fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?[0])
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn lora_model(base_dir: &str, aux: bool) -> Result<LoraModel> {
    let dir = fixtures().join(base_dir);
    let mut cfg = moe_peft_model::DeepSeekMoeConfig::from_file(dir.join("config.json"))?;
    if !aux {
        cfg.aux_loss_alpha = 0.0;
    }
    let ck = moe_peft_model::Checkpoint::open_dir(&dir)?;
    let model = MoeModel::load(cfg, &ck, &LoadOptions::default())?;
    Ok(LoraModel::from_pretrained(
        model,
        &fixtures().join("lora/adapter"),
    )?)
}

/// Elementwise `|ours − ref| ≤ 1e-6 + 1e-4·|ref|` for every tensor of `reference`.
fn check_grads(trainer: &Trainer, grads: &[Option<Tensor>], reference: &Path) -> Result<()> {
    let want = load(reference)?;
    assert_eq!(want.len(), trainer.vars().len());
    let mut worst = 0f32;
    for ((name, _), g) in trainer.vars().iter().zip(grads) {
        let w = &want[name];
        let g = g.as_ref().unwrap_or_else(|| panic!("{name}: no gradient"));
        let excess = ((g - w)?.abs()? - (w.abs()? * 1e-4)?)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        worst = worst.max(excess);
        assert!(
            excess <= 1e-6,
            "{name}: gradient off by {excess} beyond 1e-4·|ref|"
        );
    }
    eprintln!(
        "{}: worst excess over 1e-4·|ref| = {worst:e}",
        reference.display()
    );
    Ok(())
}

#[test]
fn loaded_peft_adapter_gives_peft_logits_and_loss() -> Result<()> {
    let out = load(&fixtures().join("lora/lora_outputs.safetensors"))?;
    let lm = lora_model("tiny_deepseek_moe", true)?;
    assert_eq!(lm.adapters().len(), 69);
    let b = batch()?;
    let o = lm
        .model()
        .forward_t(&b.input_ids, Some(&b.attention_mask), false)?;
    let d = max_abs(&o.logits, &out["lora.logits_eval"])?;
    assert!(d <= 2e-5, "eval logits differ by {d}");
    let loss = causal_lm_loss(&o.logits, &b.labels)?
        .loss
        .to_scalar::<f32>()?;
    assert!(
        (loss - scalar(&out["lora.loss_eval"])?).abs() <= 1e-5,
        "loss {loss}"
    );
    let o = lm
        .model()
        .forward_t(&b.input_ids, Some(&b.attention_mask), true)?;
    let d = max_abs(&o.logits, &out["lora.logits_train"])?;
    assert!(d <= 2e-5, "train logits differ by {d}");
    for (i, a) in o.aux_losses.iter().enumerate() {
        let want = scalar(&out[&format!("lora.train.aux_loss.layer{}", i + 1)])?;
        let got = a.to_scalar::<f32>()?;
        assert!(
            ((got - want) / want).abs() <= 1e-4,
            "aux {}: {got} vs {want}",
            i + 1
        );
    }
    Ok(())
}

#[test]
fn lora_gradients_match_peft_with_and_without_checkpointing() -> Result<()> {
    let b = batch()?;
    for (aux, file) in [
        (true, "lora/lora_grads.safetensors"),
        (false, "lora/lora_grads_ce_only.safetensors"),
    ] {
        let mut per_mode = Vec::new();
        for ckpt in [true, false] {
            let t = Trainer::new(
                lora_model("tiny_deepseek_moe", aux)?,
                TrainConfig {
                    gradient_checkpointing: ckpt,
                    ..Default::default()
                },
            )?;
            let mg = t.micro_gradients(&b, 1.0)?;
            let want = load(&fixtures().join("lora/lora_outputs.safetensors"))?;
            assert!((mg.loss as f32 - scalar(&want["lora.loss_train"])?).abs() <= 1e-5);
            check_grads(&t, &mg.grads, &fixtures().join(file))?;
            per_mode.push(mg.grads);
        }
        // Checkpointing on/off: the same gradients up to f32 summation order.
        for (a, b) in per_mode[0].iter().zip(&per_mode[1]) {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            let d = max_abs(a, b)?;
            assert!(d <= 1e-7, "checkpointing changes a gradient by {d}");
        }
    }
    Ok(())
}

#[test]
fn every_adapter_gets_a_gradient_when_its_expert_got_tokens() -> Result<()> {
    let t = Trainer::new(
        lora_model("tiny_deepseek_moe", true)?,
        TrainConfig::default(),
    )?;
    let mg = t.micro_gradients(&batch()?, 1.0)?;
    for ((name, _), g) in t.vars().iter().zip(&mg.grads) {
        let g = g.as_ref().unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        assert!(n.is_finite() && n > 0.0, "{name}: gradient norm {n}");
    }
    Ok(())
}

#[test]
fn merge_matches_peft_merge_and_unload() -> Result<()> {
    let out = load(&fixtures().join("lora/lora_outputs.safetensors"))?;
    let merged_ref = load(&fixtures().join("lora/merged.safetensors"))?;
    let lm = lora_model("tiny_deepseek_moe", true)?;
    let b = batch()?;
    let before = lm
        .model()
        .forward_t(&b.input_ids, Some(&b.attention_mask), false)?
        .logits;
    lm.merge()?;
    let e = lm.merge().unwrap_err().to_string();
    assert!(e.contains("already merged"), "{e}");
    let after = lm
        .model()
        .forward_t(&b.input_ids, Some(&b.attention_mask), false)?
        .logits;
    let d = max_abs(&before, &after)?;
    assert!(d <= 1e-5, "merged vs unmerged logits (alpha 16 ≠ r 8): {d}");
    lm.unmerge()?;
    let model = lm.merge_and_unload()?;
    let mut worst = 0f32;
    model.visit_weights(&mut |name, w| {
        let t = w.materialize(DType::F32)?;
        let d = (t - &merged_ref[name])
            .and_then(|x| x.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>());
        worst = worst.max(d.map_err(moe_peft_model::Error::from)?);
        Ok(())
    })?;
    assert!(
        worst <= 1e-6,
        "merged weights differ from PEFT's by {worst}"
    );
    let logits = model
        .forward_t(&b.input_ids, Some(&b.attention_mask), false)?
        .logits;
    let d = max_abs(&logits, &out["merged.logits"])?;
    assert!(d <= 2e-5, "merged logits vs PEFT {d}");
    Ok(())
}

#[test]
fn qlora_on_the_bitsandbytes_nf4_base_matches() -> Result<()> {
    let q = load(&fixtures().join("nf4/qlora_outputs.safetensors"))?;
    let b = batch()?;
    let base = MoeModel::from_pretrained(
        fixtures().join("nf4/tiny_deepseek_moe_nf4"),
        &LoadOptions::default(),
    )?;
    let o = base.forward_t(&b.input_ids, Some(&b.attention_mask), false)?;
    let d = max_abs(&o.logits, &q["nf4_base.logits"])?;
    assert!(d <= 2e-5, "NF4 base logits differ by {d}");
    let lm = LoraModel::from_pretrained(base, &fixtures().join("lora/adapter"))?;
    let o = lm
        .model()
        .forward_t(&b.input_ids, Some(&b.attention_mask), false)?;
    let loss = causal_lm_loss(&o.logits, &b.labels)?
        .loss
        .to_scalar::<f32>()?;
    assert!(
        (loss - scalar(&q["qlora.loss_eval"])?).abs() <= 1e-5,
        "QLoRA loss {loss}"
    );
    let t = Trainer::new(lm, TrainConfig::default())?;
    let mg = t.micro_gradients(&b, 1.0)?;
    assert!((mg.loss as f32 - scalar(&q["qlora.loss_train"])?).abs() <= 1e-5);
    check_grads(
        &t,
        &mg.grads,
        &fixtures().join("nf4/qlora_grads.safetensors"),
    )
}
