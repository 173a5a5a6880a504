//! Qwen2-MoE, Qwen3-MoE, Mixtral and OLMoE against transformers 4.56.2's own implementations on
//! tiny configs (fixtures/families, written by tools/fixtures/moe_families.py): logits,
//! cross-entropy, the Switch balancing loss and the total loss, in training and eval mode.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use moe_peft_model::{causal_lm_loss, AuxLoss, Family, LoadOptions, ModelConfig, MoeModel};

const FAMILIES: [&str; 4] = ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe"];

fn dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/families")
        .join(family)
}

fn reference(family: &str) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        dir(family).join("forward.safetensors"),
        &Device::Cpu,
    )?)
}

fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?[0])
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn every_family_gives_transformers_logits_and_losses() -> Result<()> {
    for family in FAMILIES {
        let r = reference(family)?;
        let model = MoeModel::from_pretrained(dir(family), &LoadOptions::default())?;
        assert_eq!(model.arch().family.model_type(), family);
        assert!(
            model.unused_checkpoint_tensors().is_empty(),
            "{family}: unused {:?}",
            model.unused_checkpoint_tensors()
        );
        let ids = r["input_ids"].to_dtype(DType::U32)?;
        let mask = r["attention_mask"].to_dtype(DType::U32)?;
        let labels = &r["labels"];
        let AuxLoss::Switch { coef } = model.arch().aux else {
            panic!("{family}: the fixture turns output_router_logits on");
        };
        for train in [false, true] {
            let o = model.forward_t(&ids, Some(&mask), train)?;
            let d = max_abs(&o.logits, &r["logits"])?;
            assert!(d <= 2e-5, "{family} (train {train}): logits differ by {d}");
            let ce = causal_lm_loss(&o.logits, labels)?.loss.to_scalar::<f32>()?;
            let want = scalar(&r["ce"])?;
            assert!((ce - want).abs() <= 1e-5, "{family}: ce {ce} vs {want}");
            if !train {
                assert!(o.aux_losses.is_empty());
                continue;
            }
            // One Switch loss for the pass, already times its coefficient.
            assert_eq!(o.aux_losses.len(), 1, "{family}");
            let aux = o.aux_losses[0].to_scalar::<f32>()? as f64;
            let want = coef * scalar(&r["aux"])? as f64;
            assert!(
                ((aux - want) / want).abs() <= 1e-4,
                "{family}: coef·aux {aux} vs {want}"
            );
            // transformers' loss is ce + coef·aux.
            let (lo, aux) = model.loss(&ids, Some(&mask), labels, true)?;
            let total = lo.loss.to_scalar::<f32>()? + aux[0].to_scalar::<f32>()?;
            let want = scalar(&r["loss"])?;
            assert!(
                (total - want).abs() <= 1e-5,
                "{family}: loss {total} vs {want}"
            );
        }
    }
    Ok(())
}

#[test]
fn configs_pick_the_family_round_trip_and_name_bad_fields() -> Result<()> {
    for family in FAMILIES {
        let cfg = ModelConfig::from_file(dir(family).join("config.json"))?;
        assert_eq!(cfg.family(), Family::from_model_type(family).unwrap());
        let text = serde_json::to_string(&cfg.to_json()?)?;
        let again = ModelConfig::from_json(&text, "round trip")?;
        assert_eq!(again, cfg, "{family}");
        // Keys the model does not read survive (transformers 4.56 writes `dtype`).
        assert!(text.contains("\"dtype\""), "{family}: {text}");
    }
    let bad = |json: &str| {
        ModelConfig::from_json(json, "config.json")
            .unwrap_err()
            .to_string()
    };
    let e = bad(r#"{"model_type": "llama"}"#);
    assert!(e.contains("model_type") && e.contains("qwen3_moe"), "{e}");
    let e = bad(r#"{"model_type": "mixtral", "router_jitter_noise": 0.1}"#);
    assert!(e.contains("router_jitter_noise"), "{e}");
    let e = bad(r#"{"model_type": "qwen2_moe", "use_sliding_window": true}"#);
    assert!(e.contains("use_sliding_window"), "{e}");
    let e = bad(r#"{"model_type": "qwen3_moe", "num_hidden_layers": 2, "mlp_only_layers": [30]}"#);
    assert!(e.contains("mlp_only_layers"), "{e}");
    let e = bad(r#"{"model_type": "olmoe", "num_experts_per_tok": 65}"#);
    assert!(e.contains("num_experts_per_tok"), "{e}");
    let e = bad(r#"{"model_type": "olmoe", "hidden_act": "swish"}"#);
    assert!(e.contains("hidden_act"), "{e}");
    // Mixtral's rope_scaling is read (linear only).
    let e =
        bad(r#"{"model_type": "mixtral", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#);
    assert!(
        e.contains("rope_scaling") && e.contains("config.json"),
        "{e}"
    );
    let c = ModelConfig::from_json(
        r#"{"model_type": "mixtral", "rope_scaling": {"type": "linear", "factor": 2.0}}"#,
        "config.json",
    )?;
    assert_eq!(c.arch()?.rope_scaling.map(|r| r.factor), Some(2.0));
    // A list of eos ids (as some configs have) is read; the first is used.
    let c = ModelConfig::from_json(
        r#"{"model_type": "qwen3_moe", "eos_token_id": [7, 8]}"#,
        "config.json",
    )?;
    assert_eq!(c.arch()?.eos_token_id, Some(7));
    Ok(())
}

#[test]
fn mixtral_refuses_passes_longer_than_its_window() -> Result<()> {
    let mut cfg = match ModelConfig::from_file(dir("mixtral").join("config.json"))? {
        ModelConfig::Mixtral(c) => c,
        other => panic!("{:?}", other.family()),
    };
    cfg.sliding_window = Some(8);
    let model = MoeModel::random(cfg, &LoadOptions::default(), 0)?;
    let ids = Tensor::zeros((1, 9), DType::U32, &Device::Cpu)?;
    let e = model.forward_t(&ids, None, false).unwrap_err().to_string();
    assert!(e.contains("sliding_window"), "{e}");
    let ids = Tensor::zeros((1, 8), DType::U32, &Device::Cpu)?;
    model.forward_t(&ids, None, false)?;
    Ok(())
}

#[test]
fn the_switch_loss_can_be_turned_off_or_reweighted() -> Result<()> {
    let r = reference("olmoe")?;
    let ids = r["input_ids"].to_dtype(DType::U32)?;
    let mask = r["attention_mask"].to_dtype(DType::U32)?;
    let mut model = MoeModel::from_pretrained(dir("olmoe"), &LoadOptions::default())?;
    let aux = |m: &MoeModel| -> Result<Vec<f32>> {
        m.forward_t(&ids, Some(&mask), true)?
            .aux_losses
            .iter()
            .map(|t| Ok(t.to_scalar::<f32>()?))
            .collect()
    };
    let want = scalar(&r["aux"])?;
    model.set_switch_aux(None, Some(0.5))?;
    let got = aux(&model)?;
    assert!(
        ((got[0] - 0.5 * want) / want).abs() <= 1e-4,
        "{got:?} vs {want}"
    );
    model.set_switch_aux(Some(false), None)?;
    assert!(aux(&model)?.is_empty());
    assert!(model.set_switch_aux(None, Some(2.0)).is_err());
    let mut ds = MoeModel::random(
        moe_peft_model::DeepSeekMoeConfig::tiny(64),
        &LoadOptions::default(),
        0,
    )?;
    let e = ds.set_switch_aux(Some(true), None).unwrap_err().to_string();
    assert!(e.contains("aux_loss_alpha"), "{e}");
    Ok(())
}

/// transformers quantizes the routers of these families too (they are `nn.Linear`): a 4-bit
/// router in a checkpoint is dequantized on load, giving the logits of its dequantized value.
/// And a 4-bit base saved here keeps its routers dense, saying so in `llm_int8_skip_modules`.
#[test]
fn four_bit_routers_load_and_saved_bases_skip_them() -> Result<()> {
    use moe_peft_quant::{FourBitConfig, FourBitTensor, QuantPolicy};
    let tmp = tempfile::tempdir()?;
    let src = dir("olmoe");
    let mut w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)?;
    let name = "model.layers.1.mlp.gate";
    let q = FourBitTensor::quantize(&w[&format!("{name}.weight")], &FourBitConfig::default())?;
    let mut dense = w.clone();
    dense.insert(format!("{name}.weight"), q.dequantize(DType::F32)?);
    w.remove(&format!("{name}.weight"));
    for (k, t) in q.to_bnb_tensors(name)? {
        w.insert(k, t);
    }
    for (d, weights) in [("packed", &w), ("dense", &dense)] {
        std::fs::create_dir_all(tmp.path().join(d))?;
        candle_core::safetensors::save(weights, tmp.path().join(d).join("model.safetensors"))?;
        std::fs::copy(
            src.join("config.json"),
            tmp.path().join(d).join("config.json"),
        )?;
    }
    let r = reference("olmoe")?;
    let ids = r["input_ids"].to_dtype(DType::U32)?;
    let logits = |d: &str| -> Result<Tensor> {
        let m = MoeModel::from_pretrained(tmp.path().join(d), &LoadOptions::default())?;
        assert!(m.unused_checkpoint_tensors().is_empty(), "{d}");
        Ok(m.forward_t(&ids, None, false)?.logits)
    };
    let d = max_abs(&logits("packed")?, &logits("dense")?)?;
    assert!(
        d <= 1e-6,
        "a 4-bit router differs from its dequantized value by {d}"
    );
    // Saved 4-bit: routers dense, named in llm_int8_skip_modules, and the base reloads.
    let m = MoeModel::from_pretrained(
        src,
        &LoadOptions {
            quant: QuantPolicy::qlora(),
            ..Default::default()
        },
    )?;
    let out = tmp.path().join("saved");
    m.save_quantized(&out, 1 << 30)?;
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json"))?)?;
    assert_eq!(
        cfg["quantization_config"]["llm_int8_skip_modules"],
        serde_json::json!(["lm_head", "gate", "shared_expert_gate"])
    );
    assert_eq!(cfg["dtype"], "float32");
    let again = MoeModel::from_pretrained(&out, &LoadOptions::default())?;
    let d = max_abs(
        &again.forward_t(&ids, None, false)?.logits,
        &m.forward_t(&ids, None, false)?.logits,
    )?;
    assert!(d <= 1e-6, "reloaded 4-bit base differs by {d}");
    Ok(())
}

/// Mixtral and the others divide the top-k weights by their sum even for top-1 (DeepSeekMoE
/// only for top-k > 1), so one expert per token gets weight 1.
#[test]
fn top_one_routing_is_renormalized_outside_deepseek() -> Result<()> {
    let mut cfg = match ModelConfig::from_file(dir("mixtral").join("config.json"))? {
        ModelConfig::Mixtral(c) => c,
        other => panic!("{:?}", other.family()),
    };
    cfg.num_experts_per_tok = 1;
    let model = MoeModel::random(cfg, &LoadOptions::default(), 0)?;
    let moe = match &model.layers[0].mlp {
        moe_peft_model::MoeOrMlp::Moe(m) => m,
        _ => panic!("Mixtral layers are MoE"),
    };
    let x = Tensor::randn(0f32, 1.0, (5, 32), &Device::Cpu)?;
    let w = moe
        .gate
        .route(&x)?
        .topk_weight
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert!(w.iter().all(|&v| (v - 1.0).abs() < 1e-6), "{w:?}");
    Ok(())
}

/// Generation's KV-cached passes (prefill, then one token at a time) give the logits of one
/// full pass, for every family (GQA, q/k norms, biases, clamps with cached keys).
#[test]
fn cached_passes_equal_one_full_pass() -> Result<()> {
    for family in FAMILIES {
        let r = reference(family)?;
        let model = MoeModel::from_pretrained(dir(family), &LoadOptions::default())?;
        let ids = r["input_ids"].to_dtype(DType::U32)?.narrow(0, 0, 1)?;
        let full = model.forward_t(&ids, None, false)?.logits;
        let mut cache = moe_peft_model::KvCache::new(model.layers.len());
        let mut parts = vec![model.forward_cached(&ids.narrow(1, 0, 5)?, None, &mut cache)?];
        for t in 5..ids.dim(1)? {
            parts.push(model.forward_cached(&ids.narrow(1, t, 1)?, None, &mut cache)?);
        }
        let cached = Tensor::cat(&parts, 1)?;
        let d = max_abs(&cached, &full)?;
        assert!(d <= 1e-5, "{family}: cached logits differ by {d}");
    }
    Ok(())
}
