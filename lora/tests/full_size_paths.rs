//! The paths a full-size run takes, checked on the tiny fixtures: the streaming merge against
//! PEFT's `merge_and_unload` and against the in-memory merge (dense, bitsandbytes 4-bit and
//! re-quantized bases, sharded input and output), optimizer state that round-trips exactly in
//! both file layouts, and inference without a recorded graph.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use moe_peft_lora::{
    merge_checkpoint, AdamW, AdamWConfig, LoraConfig, LoraModel, MergeOptions, TargetModules,
};
use moe_peft_model::{DeepSeekMoeConfig, LoadOptions, MoeModel};
use moe_peft_quant::QuantPolicy;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn load(p: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(p, &Device::Cpu)?)
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

/// Every tensor of the merged directory `dir`, by name.
fn merged_tensors(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let ck = moe_peft_model::Checkpoint::open_dir(dir)?;
    ck.names()
        .into_iter()
        .map(|n| Ok((n.clone(), ck.get_raw(&n, &Device::Cpu)?)))
        .collect()
}

#[test]
fn streaming_merge_matches_peft_merge_and_unload() -> Result<()> {
    let want = load(&fixtures().join("lora/merged.safetensors"))?;
    for (base, shard) in [
        ("tiny_deepseek_moe", 5_000_000_000usize),
        ("tiny_deepseek_moe/sharded", 60_000),
    ] {
        let out = tempfile::tempdir()?;
        let rep = merge_checkpoint(
            &fixtures().join(base),
            &fixtures().join("lora/adapter"),
            out.path(),
            &MergeOptions {
                dtype: DType::F32,
                max_shard_bytes: shard,
                ..Default::default()
            },
        )?;
        assert!(rep.merged_sites > 0);
        if shard < 1_000_000 {
            assert!(out.path().join("model.safetensors.index.json").exists());
        }
        let got = merged_tensors(out.path())?;
        assert_eq!(got.len(), want.len(), "{base}");
        let mut worst = 0f32;
        for (k, w) in &want {
            worst = worst.max(max_abs(&got[k], w)?);
        }
        assert!(
            worst <= 1e-6,
            "{base}: merged weights differ from PEFT's by {worst}"
        );
        let cfg = DeepSeekMoeConfig::from_file(out.path().join("config.json"))?;
        assert_eq!(cfg.torch_dtype.as_deref(), Some("float32"));
    }
    Ok(())
}

#[test]
fn streaming_merge_of_4bit_bases_matches_the_in_memory_merge() -> Result<()> {
    // A base stored in bitsandbytes layout, and a dense base re-quantized to NF4 first: both
    // must equal LoraModel::merge_and_unload on the same 4-bit base.
    let cases = [
        ("nf4/tiny_deepseek_moe_nf4", None, QuantPolicy::None),
        (
            "tiny_deepseek_moe",
            Some(moe_peft_quant::FourBitConfig::default()),
            QuantPolicy::qlora(),
        ),
    ];
    for (base, requantize, policy) in cases {
        let out = tempfile::tempdir()?;
        merge_checkpoint(
            &fixtures().join(base),
            &fixtures().join("lora/adapter"),
            out.path(),
            &MergeOptions {
                dtype: DType::F32,
                requantize,
                ..Default::default()
            },
        )?;
        let got = merged_tensors(out.path())?;
        let model = MoeModel::from_pretrained(
            fixtures().join(base),
            &LoadOptions {
                quant: policy,
                ..Default::default()
            },
        )?;
        let merged = LoraModel::from_pretrained(model, &fixtures().join("lora/adapter"))?
            .merge_and_unload()?;
        let mut worst = 0f32;
        let mut n = 0;
        merged.visit_weights(&mut |name, w| {
            let t = w.materialize(DType::F32)?;
            let d = max_abs(&t, &got[name])
                .map_err(|e| moe_peft_model::Error::InvalidInput(format!("{name}: {e}")))?;
            worst = worst.max(d);
            n += 1;
            Ok(())
        })?;
        assert_eq!(n, got.len(), "{base}: every tensor written once");
        assert!(
            worst <= 1e-6,
            "{base}: streaming vs in-memory merge {worst}"
        );
    }
    Ok(())
}

#[test]
fn merge_refuses_an_adapter_that_does_not_fit() -> Result<()> {
    let adapter = tempfile::tempdir()?;
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            fixtures().join("lora/adapter").join(f),
            adapter.path().join(f),
        )?;
    }
    // Drop one lora_B: the merge must name the site, not write a half-merged model.
    let p = adapter.path().join("adapter_model.safetensors");
    let mut t = load(&p)?;
    let key = t
        .keys()
        .find(|k| k.ends_with("lora_B.weight"))
        .cloned()
        .unwrap();
    t.remove(&key);
    candle_core::safetensors::save(&t, &p)?;
    let out = tempfile::tempdir()?;
    let e = merge_checkpoint(
        &fixtures().join("tiny_deepseek_moe"),
        adapter.path(),
        out.path(),
        &MergeOptions::default(),
    )
    .unwrap_err()
    .to_string();
    let site = key
        .trim_start_matches("base_model.model.")
        .trim_end_matches(".lora_B.weight");
    assert!(e.contains(site) && e.contains("lora_A / lora_B"), "{e}");
    Ok(())
}

/// Every file of `dir` with its bytes.
fn snapshot(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_file() {
            v.push((p.clone(), std::fs::read(&p)?));
        }
    }
    v.sort();
    Ok(v)
}

#[test]
fn merge_refuses_to_write_over_its_inputs() -> Result<()> {
    // A copy of the base (with a tokenizer file, passed as an extra file to copy) and of the
    // adapter; the output directory named as either input, however spelled, is refused before
    // anything is opened for writing, and both inputs stay byte for byte as they were. (This
    // used to overwrite the base's weights and leave its tokenizer files empty.)
    let root = tempfile::tempdir()?;
    let base = root.path().join("base");
    let adapter = root.path().join("adapter");
    std::fs::create_dir_all(&base)?;
    std::fs::create_dir_all(&adapter)?;
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny_deepseek_moe").join(f), base.join(f))?;
    }
    std::fs::copy(
        fixtures().join("tokenizer/tokenizer.json"),
        base.join("tokenizer.json"),
    )?;
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixtures().join("lora/adapter").join(f), adapter.join(f))?;
    }
    let (before_base, before_adapter) = (snapshot(&base)?, snapshot(&adapter)?);
    let opts = MergeOptions {
        extra_files: vec![base.join("tokenizer.json")],
        ..Default::default()
    };
    for (out, what) in [
        (root.path().join("base/../base"), "base model"),
        (base.join("."), "base model"),
        (root.path().join("./adapter"), "adapter"),
    ] {
        let e = merge_checkpoint(&base, &adapter, &out, &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("is the {what} directory")), "{e}");
    }
    assert!(snapshot(&base)? == before_base, "the base changed");
    assert!(snapshot(&adapter)? == before_adapter, "the adapter changed");
    // A distinct output works and carries the tokenizer file over intact.
    let out = root.path().join("merged");
    merge_checkpoint(&base, &adapter, &out, &opts)?;
    assert_eq!(
        std::fs::read(out.join("tokenizer.json"))?,
        std::fs::read(base.join("tokenizer.json"))?
    );
    Ok(())
}

#[test]
fn copy_file_onto_itself_keeps_the_file() -> Result<()> {
    let d = tempfile::tempdir()?;
    let f = d.path().join("tokenizer.json");
    std::fs::write(&f, b"{\"x\": 1}")?;
    // The same file under another spelling: std::fs::copy would truncate it to 0 bytes.
    moe_peft_model::io::copy_file(&f, &d.path().join("./tokenizer.json"))?;
    assert_eq!(std::fs::read(&f)?, b"{\"x\": 1}");
    Ok(())
}

fn vars(n: usize) -> Result<Vec<(String, Var)>> {
    (0..n)
        .map(|i| {
            let v = Var::from_tensor(&Tensor::randn(0f32, 1., (3 + i, 5), &Device::Cpu)?)?;
            Ok((format!("v{i:02}"), v))
        })
        .collect()
}

#[test]
fn optimizer_state_round_trips_exactly_in_both_layouts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for bf16_moments in [false, true] {
        let cfg = AdamWConfig {
            bf16_moments,
            ..Default::default()
        };
        let vs = vars(12)?;
        let mut opt = AdamW::new(vs.clone(), cfg.clone())?;
        for step in 0..3 {
            let grads: Vec<Option<Tensor>> = vs
                .iter()
                .map(|(_, v)| Ok(Some((v.as_tensor().sin()? * (step as f64 + 1.0))?)))
                .collect::<Result<_>>()?;
            opt.step(&grads, 1e-2)?;
        }
        let p = dir.path().join(format!("opt-{bf16_moments}.safetensors"));
        opt.save(&p)?;
        // Moments and step as written, read back by the generic safetensors reader.
        let saved = load(&p)?;
        assert_eq!(saved.len(), 2 * vs.len() + 1);
        // The same moments rewritten in another order (candle's writer sorts by name).
        let p2 = dir
            .path()
            .join(format!("opt-sorted-{bf16_moments}.safetensors"));
        candle_core::safetensors::save(&saved, &p2)?;
        for file in [&p, &p2] {
            let mut back = AdamW::new(vs.clone(), cfg.clone())?;
            back.load(file)?;
            assert_eq!(back.step_count(), 3);
            let p3 = dir.path().join("again.safetensors");
            back.save(&p3)?;
            let again = load(&p3)?;
            for (k, t) in &saved {
                assert_eq!(max_abs(t, &again[k])?, 0.0, "{k}");
                assert_eq!(t.dtype(), again[k].dtype(), "{k}");
            }
        }
    }
    // A missing moment is named.
    let vs = vars(2)?;
    let opt = AdamW::new(vs.clone(), AdamWConfig::default())?;
    let p = dir.path().join("short.safetensors");
    opt.save(&p)?;
    let mut t = load(&p)?;
    t.remove("v01.exp_avg_sq");
    candle_core::safetensors::save(&t, &p)?;
    let e = AdamW::new(vs, AdamWConfig::default())?
        .load(&p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("v01.exp_avg_sq"), "{e}");
    Ok(())
}

#[test]
fn inference_under_no_grad_records_no_graph() -> Result<()> {
    let model = MoeModel::random(
        DeepSeekMoeConfig::tiny(96),
        &LoadOptions {
            quant: QuantPolicy::qlora(),
            ..Default::default()
        },
        3,
    )?;
    let lm = LoraModel::new(
        model,
        LoraConfig {
            r: 4,
            target_modules: Some(TargetModules::List(
                moe_peft_lora::DEEPSEEK_TARGETS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            )),
            modules_to_save: Some(vec!["embed_tokens".into(), "lm_head".into()]),
            ..Default::default()
        },
        1,
    )?;
    // B = 0 at init would hide the adapters: give them values.
    for (_, v) in lm.trainable_vars() {
        v.set(&(v.as_tensor().ones_like()? * 0.01)?.add(v.as_tensor())?)?;
    }
    let ids = Tensor::new(&[[3u32, 9, 27, 81, 50, 2]], &Device::Cpu)?;
    let with = lm.model().forward_t(&ids, None, false)?.logits;
    assert!(
        with.track_op(),
        "adapters and saved modules are variables: a graph is recorded"
    );
    let without = {
        let _g = moe_peft_model::grad::no_grad();
        lm.model().forward_t(&ids, None, false)?.logits
    };
    assert!(!without.track_op(), "no graph under no_grad");
    assert_eq!(max_abs(&with, &without)?, 0.0);
    let gen = lm.model().generate(
        &[3, 9, 27],
        &moe_peft_model::GenerateOptions {
            max_new_tokens: 4,
            ..Default::default()
        },
    )?;
    assert_eq!(gen.len(), 4);
    Ok(())
}
