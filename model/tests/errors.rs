//! Bad checkpoints and configs give errors that name the tensor, file or field.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{Device, Tensor};
use moe_peft_model::{DeepSeekMoeConfig, LoadOptions, MoeModel};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny_deepseek_moe")
}

fn write_model(dir: &std::path::Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    std::fs::copy(fixture_dir().join("config.json"), dir.join("config.json"))?;
    candle_core::safetensors::save(tensors, dir.join("model.safetensors"))?;
    Ok(())
}

#[test]
fn missing_tensor_is_named_with_its_file() -> Result<()> {
    let mut t =
        candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)?;
    t.remove("model.layers.2.mlp.experts.5.up_proj.weight");
    let dir = tempfile::tempdir()?;
    write_model(dir.path(), &t)?;
    let e = MoeModel::from_pretrained(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.2.mlp.experts.5.up_proj.weight"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
    Ok(())
}

#[test]
fn wrong_shape_is_named_with_both_shapes() -> Result<()> {
    let mut t =
        candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)?;
    t.insert(
        "model.layers.1.self_attn.k_proj.weight".into(),
        Tensor::zeros((64, 32), candle_core::DType::F32, &Device::Cpu)?,
    );
    let dir = tempfile::tempdir()?;
    write_model(dir.path(), &t)?;
    let e = MoeModel::from_pretrained(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.layers.1.self_attn.k_proj.weight"), "{e}");
    assert!(e.contains("[64, 64]") && e.contains("[64, 32]"), "{e}");
    Ok(())
}

#[test]
fn bad_config_value_names_the_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let text = std::fs::read_to_string(fixture_dir().join("config.json"))?;
    let text = text.replace("\"num_experts_per_tok\": 3", "\"num_experts_per_tok\": 12");
    std::fs::write(dir.path().join("config.json"), text)?;
    std::fs::copy(
        fixture_dir().join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )?;
    let e = MoeModel::from_pretrained(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_experts_per_tok"), "{e}");
    // Malformed JSON names the file.
    std::fs::write(dir.path().join("config.json"), "{\"hidden_size\": 64,")?;
    let e = DeepSeekMoeConfig::from_file(dir.path().join("config.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
    // No weights at all.
    let empty = tempfile::tempdir()?;
    std::fs::copy(
        fixture_dir().join("config.json"),
        empty.path().join("config.json"),
    )?;
    let e = MoeModel::from_pretrained(empty.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("safetensors"), "{e}");
    Ok(())
}

#[test]
fn out_of_vocabulary_ids_are_rejected() -> Result<()> {
    let model = MoeModel::from_pretrained(fixture_dir(), &LoadOptions::default())?;
    let ids = Tensor::new(&[[1u32, 2, 600]], &Device::Cpu)?;
    let e = model.forward_t(&ids, None, false).unwrap_err().to_string();
    assert!(e.contains("600"), "{e}");
    Ok(())
}

#[test]
fn non_finite_weights_are_refused_by_name() -> Result<()> {
    // A NaN in a routed expert's projection, an Inf in a norm: dense or quantized on load, the
    // model is refused and the tensor named. (Quantized to NF4, the NaN block used to get a
    // finite absmax and train with a finite loss.)
    let clean =
        candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)?;
    for (name, bad) in [
        ("model.layers.1.mlp.experts.3.up_proj.weight", f32::NAN),
        (
            "model.layers.2.post_attention_layernorm.weight",
            f32::INFINITY,
        ),
    ] {
        let mut t = clean.clone();
        let w = &t[name];
        let mut v = w.flatten_all()?.to_vec1::<f32>()?;
        v[7] = bad;
        let shape = w.shape().clone();
        t.insert(name.to_string(), Tensor::from_vec(v, shape, &Device::Cpu)?);
        let dir = tempfile::tempdir()?;
        write_model(dir.path(), &t)?;
        for quant in [
            moe_peft_model::QuantPolicy::None,
            moe_peft_model::QuantPolicy::qlora(),
        ] {
            let opts = LoadOptions {
                quant,
                ..Default::default()
            };
            let e = MoeModel::from_pretrained(dir.path(), &opts)
                .unwrap_err()
                .to_string();
            assert!(e.contains(name) && e.contains("NaN or infinite"), "{e}");
            assert!(e.contains("model.safetensors"), "{e}");
        }
    }
    // The clean fixture still loads.
    MoeModel::from_pretrained(fixture_dir(), &LoadOptions::default())?;
    Ok(())
}

#[test]
fn unused_checkpoint_tensors_are_listed() -> Result<()> {
    // A tensor no DeepSeekMoE layer reads (a renamed or foreign layer) is reported by name, as
    // transformers warns; the clean fixture, dense or as a bitsandbytes 4-bit checkpoint, has none.
    let mut t =
        candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)?;
    t.insert(
        "model.layers.1.mlp.extra_proj.weight".into(),
        Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu)?,
    );
    let dir = tempfile::tempdir()?;
    write_model(dir.path(), &t)?;
    let m = MoeModel::from_pretrained(dir.path(), &LoadOptions::default())?;
    assert_eq!(
        m.unused_checkpoint_tensors(),
        ["model.layers.1.mlp.extra_proj.weight".to_string()]
    );
    let clean = MoeModel::from_pretrained(fixture_dir(), &LoadOptions::default())?;
    assert!(clean.unused_checkpoint_tensors().is_empty());
    let bnb = fixture_dir().join("../nf4/tiny_deepseek_moe_nf4");
    let q = MoeModel::from_pretrained(&bnb, &LoadOptions::default())?;
    assert!(
        q.unused_checkpoint_tensors().is_empty(),
        "{:?}",
        q.unused_checkpoint_tensors()
    );
    Ok(())
}
