//! PEFT LoRA on Qwen2-MoE, Qwen3-MoE, Mixtral and OLMoE against PEFT 0.17.1 on transformers
//! 4.56.2 (fixtures/families, tools/fixtures/moe_families.py): PEFT's adapter files load under
//! each family's module names (Mixtral's `block_sparse_moe.experts.N.w1`, Qwen2-MoE's
//! `shared_expert`), give PEFT's logits, and our gradients of `ce + coef·aux` equal PEFT's,
//! with and without gradient checkpointing.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use moe_peft_lora::{LoraModel, TrainBatch, TrainConfig, Trainer};
use moe_peft_model::{AuxLoss, LoadOptions, MoeModel};

const FAMILIES: [(&str, usize); 4] = [
    ("qwen2_moe", 69),
    ("qwen3_moe", 63),
    ("mixtral", 84),
    ("olmoe", 84),
];

fn dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/families")
        .join(family)
}

fn load(family: &str, file: &str) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        dir(family).join(file),
        &Device::Cpu,
    )?)
}

fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?[0])
}

fn lora(family: &str) -> Result<LoraModel> {
    let model = MoeModel::from_pretrained(dir(family), &LoadOptions::default())?;
    Ok(LoraModel::from_pretrained(
        model,
        &dir(family).join("adapter"),
    )?)
}

#[test]
fn peft_adapters_load_and_give_peft_logits() -> Result<()> {
    for (family, n) in FAMILIES {
        let r = load(family, "forward.safetensors")?;
        let lm = lora(family)?;
        assert_eq!(lm.adapters().len(), n, "{family}");
        let ids = r["input_ids"].to_dtype(DType::U32)?;
        let mask = r["attention_mask"].to_dtype(DType::U32)?;
        let o = lm.model().forward_t(&ids, Some(&mask), false)?;
        let d = (&o.logits - &r["lora.logits"])?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d <= 2e-5, "{family}: logits differ by {d}");
    }
    Ok(())
}

#[test]
fn lora_gradients_match_peft_for_every_family() -> Result<()> {
    for (family, _) in FAMILIES {
        let r = load(family, "forward.safetensors")?;
        let want = load(family, "lora_grads.safetensors")?;
        let b = TrainBatch {
            input_ids: r["input_ids"].to_dtype(DType::U32)?,
            attention_mask: r["attention_mask"].to_dtype(DType::U32)?,
            labels: r["labels"].clone(),
            packed: false,
        };
        let mut per_mode = Vec::new();
        for ckpt in [true, false] {
            let lm = lora(family)?;
            let AuxLoss::Switch { coef } = lm.model().arch().aux else {
                panic!("{family}: the fixture turns output_router_logits on");
            };
            let t = Trainer::new(
                lm,
                TrainConfig {
                    gradient_checkpointing: ckpt,
                    ..Default::default()
                },
            )?;
            let mg = t.micro_gradients(&b, 1.0)?;
            let ce = scalar(&r["lora.ce"])?;
            assert!(
                (mg.loss as f32 - ce).abs() <= 1e-5,
                "{family}: ce {}",
                mg.loss
            );
            let aux = coef * scalar(&r["lora.aux"])? as f64;
            assert!(
                ((mg.aux_loss - aux) / aux).abs() <= 1e-4,
                "{family}: coef·aux {} vs {aux}",
                mg.aux_loss
            );
            assert_eq!(want.len(), t.vars().len(), "{family}");
            let mut worst = 0f32;
            for ((name, v), g) in t.vars().iter().zip(&mg.grads) {
                let w = &want[name];
                let g = match g {
                    Some(g) => g.clone(),
                    // An expert no token chose: PEFT has no gradient either (zeros).
                    None => v.zeros_like()?,
                };
                let excess = ((&g - w)?.abs()? - (w.abs()? * 1e-4)?)?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                worst = worst.max(excess);
                assert!(
                    excess <= 1e-6,
                    "{family} {name}: off by {excess} beyond 1e-4·|ref|"
                );
            }
            eprintln!("{family} (checkpointing {ckpt}): worst excess {worst:e}");
            per_mode.push(mg.grads);
        }
        for (a, b) in per_mode[0].iter().zip(&per_mode[1]) {
            if let (Some(a), Some(b)) = (a, b) {
                let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(
                    d <= 1e-7,
                    "{family}: checkpointing changes a gradient by {d}"
                );
            } else {
                assert!(a.is_none() && b.is_none(), "{family}");
            }
        }
    }
    Ok(())
}

/// An adapter trained here, saved in PEFT's format and loaded again, gives the logits it had.
/// With `MOE_PEFT_ROUNDTRIP_DIR` set, each family's adapter and logits are kept there for
/// `tools/fixtures/peft_roundtrip.py`, which loads them with `PeftModel.from_pretrained` on
/// the transformers model (recorded in fixtures/README.md).
#[test]
fn adapters_trained_here_reload_with_their_logits() -> Result<()> {
    let keep = std::env::var_os("MOE_PEFT_ROUNDTRIP_DIR").map(PathBuf::from);
    let tmp = tempfile::tempdir()?;
    for (family, _) in FAMILIES {
        let r = load(family, "forward.safetensors")?;
        let model = MoeModel::from_pretrained(dir(family), &LoadOptions::default())?;
        let lm = LoraModel::new(
            model,
            moe_peft_lora::LoraConfig {
                r: 4,
                lora_alpha: 8.0,
                lora_dropout: 0.0,
                target_modules: Some(moe_peft_lora::TargetModules::List(
                    moe_peft_model::Family::from_model_type(family)
                        .expect("family")
                        .default_targets()
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                )),
                ..Default::default()
            },
            7,
        )?;
        let b = TrainBatch {
            input_ids: r["input_ids"].to_dtype(DType::U32)?,
            attention_mask: r["attention_mask"].to_dtype(DType::U32)?,
            labels: r["labels"].clone(),
            packed: false,
        };
        let mut t = Trainer::new(
            lm,
            TrainConfig {
                learning_rate: 1e-2,
                warmup_ratio: 0.0,
                ..Default::default()
            },
        )?;
        let first = t.step(std::slice::from_ref(&b))?.loss;
        let mut last = first;
        for _ in 0..4 {
            last = t.step(std::slice::from_ref(&b))?.loss;
        }
        assert!(last < first, "{family}: loss {first} → {last}");
        let lm = t.into_lora();
        let out = keep
            .as_ref()
            .map(|k| k.join(family))
            .unwrap_or_else(|| tmp.path().join(family));
        std::fs::create_dir_all(&out)?;
        lm.save_adapter(&out.join("adapter"), DType::F32)?;
        let logits = lm
            .model()
            .forward_t(&b.input_ids, Some(&b.attention_mask), false)?
            .logits;
        candle_core::safetensors::save(
            &HashMap::from([
                ("input_ids".to_string(), r["input_ids"].clone()),
                ("attention_mask".to_string(), r["attention_mask"].clone()),
                ("logits".to_string(), logits.clone()),
            ]),
            out.join("logits.safetensors"),
        )?;
        let again = lora_from(family, &out.join("adapter"))?;
        let l2 = again
            .model()
            .forward_t(&b.input_ids, Some(&b.attention_mask), false)?
            .logits;
        let d = (&l2 - &logits)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d <= 1e-6, "{family}: reloaded logits differ by {d}");
    }
    Ok(())
}

fn lora_from(family: &str, adapter: &std::path::Path) -> Result<LoraModel> {
    let model = MoeModel::from_pretrained(dir(family), &LoadOptions::default())?;
    Ok(LoraModel::from_pretrained(model, adapter)?)
}

/// PEFT would train the q/k/v biases of Qwen2-MoE with `bias: "all"`; they are not trained
/// here, so such a config is refused, by name.
#[test]
fn a_bias_setting_that_would_train_biases_is_refused() -> Result<()> {
    let with_bias_all = |family: &str| -> Result<LoraModel> {
        let model = MoeModel::from_pretrained(dir(family), &LoadOptions::default())?;
        let cfg = moe_peft_lora::LoraConfig {
            r: 2,
            lora_alpha: 4.0,
            bias: "all".into(),
            target_modules: Some(moe_peft_lora::TargetModules::List(vec!["q_proj".into()])),
            ..Default::default()
        };
        Ok(LoraModel::new(model, cfg, 0)?)
    };
    let e = with_bias_all("qwen2_moe").unwrap_err().to_string();
    assert!(e.contains("bias") && e.contains("self_attn.q_proj"), "{e}");
    // Mixtral has no biases: the setting changes nothing and is accepted.
    with_bias_all("mixtral")?;
    Ok(())
}
