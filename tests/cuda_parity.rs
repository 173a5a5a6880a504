//! CUDA against the CPU on the tiny fixture model (runs only when built with `--features cuda`
//! on a machine with a GPU): logits, loss, aux losses and LoRA gradients of one step, in f32;
//! and the bf16 path against an f32 CPU run of the same bf16-rounded weights.
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use moe_peft::lora::{LoraModel, TrainBatch, TrainConfig, Trainer};
use moe_peft::model::{LoadOptions, MoeModel};
use moe_peft::quant::QuantPolicy;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn gpu() -> Option<Device> {
    moe_peft::kernels::cuda_device_or_skip()
}

fn batch(dev: &Device) -> Result<TrainBatch> {
    let r = candle_core::safetensors::load(fixtures().join("forward.safetensors"), dev)?;
    Ok(TrainBatch {
        input_ids: r["input_ids"].to_dtype(DType::U32)?,
        attention_mask: r["attention_mask"].to_dtype(DType::U32)?,
        labels: r["labels"].clone(),
        packed: false,
    })
}

fn rel(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let den = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?.max(1e-30);
    Ok(num / den)
}

fn trainer(dev: &Device, dtype: DType, quant: QuantPolicy) -> Result<Trainer> {
    let opts = LoadOptions {
        dtype,
        device: dev.clone(),
        quant,
    };
    let base = MoeModel::from_pretrained(fixtures().join("tiny_deepseek_moe"), &opts)?;
    let lm = LoraModel::from_pretrained(base, &fixtures().join("lora/adapter"))?;
    Ok(Trainer::new(lm, TrainConfig::default())?)
}

#[test]
fn f32_logits_loss_and_lora_gradients_match_the_cpu() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    for quant in [QuantPolicy::None, QuantPolicy::qlora()] {
        let cpu_t = trainer(&Device::Cpu, DType::F32, quant.clone())?;
        let gpu_t = trainer(&gpu, DType::F32, quant.clone())?;
        let (bc, bg) = (batch(&Device::Cpu)?, batch(&gpu)?);
        let lc = cpu_t
            .lora()
            .model()
            .forward_t(&bc.input_ids, Some(&bc.attention_mask), true)?;
        let lg = gpu_t
            .lora()
            .model()
            .forward_t(&bg.input_ids, Some(&bg.attention_mask), true)?;
        let d = rel(&lg.logits, &lc.logits)?;
        println!("{quant:?}: logits rel-norm diff {d:e}");
        assert!(d < 1e-5, "logits {d}");
        for (a, b) in lg.aux_losses.iter().zip(&lc.aux_losses) {
            let (a, b) = (
                a.to_device(&Device::Cpu)?.to_scalar::<f32>()?,
                b.to_scalar::<f32>()?,
            );
            assert!(((a - b) / b).abs() < 1e-4, "aux {a} vs {b}");
        }
        let gc = cpu_t.micro_gradients(&bc, 1.0)?;
        let gg = gpu_t.micro_gradients(&bg, 1.0)?;
        println!("{quant:?}: loss cpu {} gpu {}", gc.loss, gg.loss);
        assert!((gc.loss - gg.loss).abs() < 1e-5);
        let mut worst = 0f32;
        for ((name, _), (a, b)) in cpu_t.vars().iter().zip(gc.grads.iter().zip(&gg.grads)) {
            let d = rel(b.as_ref().unwrap(), a.as_ref().unwrap())?;
            worst = worst.max(d);
            assert!(d < 1e-4, "{name}: gradient rel-norm diff {d}");
        }
        println!("{quant:?}: worst LoRA gradient rel-norm diff {worst:e}");
    }
    Ok(())
}

#[test]
fn bf16_matches_f32_of_the_same_rounded_weights() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    // The reference for bf16 is an f32 run of the bf16-rounded weights (rounding the tiny
    // model's weights flips some routing; comparing with the unrounded model would not hold).
    let dir = tempfile::tempdir()?;
    let mut w = candle_core::safetensors::load(
        fixtures().join("tiny_deepseek_moe/model.safetensors"),
        &Device::Cpu,
    )?;
    for t in w.values_mut() {
        *t = t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
    }
    candle_core::safetensors::save(&w, dir.path().join("model.safetensors"))?;
    std::fs::copy(
        fixtures().join("tiny_deepseek_moe/config.json"),
        dir.path().join("config.json"),
    )?;
    let load = |dev: &Device, dtype| {
        MoeModel::from_pretrained(
            dir.path(),
            &LoadOptions {
                dtype,
                device: dev.clone(),
                quant: QuantPolicy::None,
            },
        )
    };
    let (cpu, g16) = (load(&Device::Cpu, DType::F32)?, load(&gpu, DType::BF16)?);
    let (bc, bg) = (batch(&Device::Cpu)?, batch(&gpu)?);
    let a = cpu
        .forward_t(&bc.input_ids, Some(&bc.attention_mask), false)?
        .logits;
    let b = g16
        .forward_t(&bg.input_ids, Some(&bg.attention_mask), false)?
        .logits;
    let d = rel(&b, &a)?;
    let (la, _) = cpu.loss(&bc.input_ids, Some(&bc.attention_mask), &bc.labels, false)?;
    let (lb, _) = g16.loss(&bg.input_ids, Some(&bg.attention_mask), &bg.labels, false)?;
    let (la, lb) = (
        la.loss.to_scalar::<f32>()?,
        lb.loss.to_device(&Device::Cpu)?.to_scalar::<f32>()?,
    );
    println!("bf16 vs f32 (same rounded weights): logits rel-norm diff {d:e}, loss {lb} vs {la}");
    assert!(d < 3e-2, "bf16 logits rel-norm diff {d}");
    assert!(((la - lb) / la).abs() < 1e-2, "bf16 loss {lb} vs {la}");
    Ok(())
}

/// The other families on CUDA against the CPU (fixtures/families, PEFT adapters): logits, the
/// Switch balancing loss, the loss and every LoRA gradient, in f32, dense and NF4 bases.
#[test]
fn other_families_match_the_cpu() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    for family in ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe"] {
        let dir = fixtures().join("families").join(family);
        for quant in [QuantPolicy::None, QuantPolicy::qlora()] {
            let make = |dev: &Device| -> Result<Trainer> {
                let opts = LoadOptions {
                    dtype: DType::F32,
                    device: dev.clone(),
                    quant: quant.clone(),
                };
                let base = MoeModel::from_pretrained(&dir, &opts)?;
                let lm = LoraModel::from_pretrained(base, &dir.join("adapter"))?;
                Ok(Trainer::new(lm, TrainConfig::default())?)
            };
            let (ct, gt) = (make(&Device::Cpu)?, make(&gpu)?);
            let r = candle_core::safetensors::load(dir.join("forward.safetensors"), &Device::Cpu)?;
            let b = |dev: &Device| -> Result<TrainBatch> {
                Ok(TrainBatch {
                    input_ids: r["input_ids"].to_dtype(DType::U32)?.to_device(dev)?,
                    attention_mask: r["attention_mask"].to_dtype(DType::U32)?.to_device(dev)?,
                    labels: r["labels"].to_device(dev)?,
                    packed: false,
                })
            };
            let (bc, bg) = (b(&Device::Cpu)?, b(&gpu)?);
            let lc = ct
                .lora()
                .model()
                .forward_t(&bc.input_ids, Some(&bc.attention_mask), true)?;
            let lg = gt
                .lora()
                .model()
                .forward_t(&bg.input_ids, Some(&bg.attention_mask), true)?;
            let d = rel(&lg.logits, &lc.logits)?;
            println!("{family} {quant:?}: logits rel-norm diff {d:e}");
            assert!(d < 1e-5, "{family}: logits {d}");
            let gc = ct.micro_gradients(&bc, 1.0)?;
            let gg = gt.micro_gradients(&bg, 1.0)?;
            assert!((gc.loss - gg.loss).abs() < 1e-5, "{family}: loss");
            assert!(
                ((gc.aux_loss - gg.aux_loss) / gc.aux_loss).abs() < 1e-4,
                "{family}: aux {} vs {}",
                gg.aux_loss,
                gc.aux_loss
            );
            let mut worst = 0f32;
            for ((name, _), (a, b)) in ct.vars().iter().zip(gc.grads.iter().zip(&gg.grads)) {
                match (a, b) {
                    (Some(a), Some(b)) => {
                        let d = rel(b, a)?;
                        worst = worst.max(d);
                        assert!(d < 1e-4, "{family} {name}: gradient rel-norm diff {d}");
                    }
                    (None, None) => {}
                    _ => panic!("{family} {name}: a gradient on one device only"),
                }
            }
            println!("{family} {quant:?}: worst LoRA gradient rel-norm diff {worst:e}");
        }
    }
    Ok(())
}
