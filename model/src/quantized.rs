//! Saving a quantized base in the bitsandbytes `Linear4bit` layout, so that loading it again
//! skips quantization (see [`MoeModel::save_quantized`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use moe_peft_quant::{FourBitConfig, FourBitLinear, QuantType};

use crate::error::{Error, Result};
use crate::io::{plan_shards, save_tensors, shard_file_names, torch_dtype_name, write_shard_index};
use crate::model::{MoeModel, WeightRef};

/// Bytes per device-to-host transfer while writing.
const CHUNK_BYTES: usize = 256 << 20;

/// The `quantization_config` transformers writes for a bitsandbytes 4-bit model.
pub fn bnb_quantization_config(cfg: &FourBitConfig, compute_dtype: DType) -> serde_json::Value {
    let compute = torch_dtype_name(compute_dtype);
    serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": match cfg.quant_type { QuantType::Nf4 => "nf4", QuantType::Fp4 => "fp4" },
        "bnb_4bit_use_double_quant": cfg.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes",
    })
}

impl MoeModel {
    /// Writes this model with its 4-bit projections in bitsandbytes' `Linear4bit` layout
    /// (`weight` packed codes, `absmax`, `quant_map`, `nested_*`, `quant_state.bitsandbytes__nf4`)
    /// and every other tensor as it is held (embeddings and `lm_head` in the model dtype, norms
    /// and router in f32): shards of at most `max_shard_bytes`, an index when there are several,
    /// and `config.json` with a bitsandbytes `quantization_config`. [`MoeModel::from_pretrained`]
    /// on that directory loads the 4-bit weights as stored, skipping quantization.
    ///
    /// Fails if a projection is not 4-bit (a dense or int8 base has nothing to save here).
    pub fn save_quantized(&self, dir: &Path, max_shard_bytes: usize) -> Result<Vec<PathBuf>> {
        if max_shard_bytes == 0 {
            return Err(Error::InvalidInput(
                "max_shard_bytes must be positive".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let mut nf4: Option<FourBitConfig> = None;
        self.visit_weights(&mut |name, w| {
            match w {
                WeightRef::Tensor(t) => tensors.push((name.to_string(), t.clone())),
                WeightRef::Linear(l) => {
                    if name == "lm_head.weight" {
                        tensors.push((name.to_string(), l.dense_weight(self.dtype())?));
                        return Ok(());
                    }
                    let Some(q) = l.as_any().downcast_ref::<FourBitLinear>() else {
                        return Err(Error::InvalidInput(format!(
                            "`{name}` is not a 4-bit weight: only an NF4/FP4 base can be saved quantized (load with --bits 4)"
                        )));
                    };
                    let t = q.weight();
                    nf4.get_or_insert(FourBitConfig {
                        quant_type: t.quant_type(),
                        double_quant: t.is_double_quant(),
                        block_size: t.block_size(),
                        ..FourBitConfig::default()
                    });
                    let prefix = name.strip_suffix(".weight").unwrap_or(name);
                    tensors.extend(t.to_bnb_tensors(prefix)?);
                }
            }
            Ok(())
        })?;
        // Shards in model order; inside a shard, tensors grouped by dtype so each group reaches
        // the host in a few large copies.
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let sizes: Vec<usize> = tensors.iter().map(|(_, t)| bytes(t)).collect();
        let ranges = plan_shards(&sizes, max_shard_bytes);
        let names = shard_file_names(ranges.len());
        let mut weight_map = BTreeMap::new();
        let mut written = Vec::new();
        let mut total = 0usize;
        for (range, fname) in ranges.into_iter().zip(&names) {
            let mut shard = tensors[range].to_vec();
            shard.sort_by_key(|(_, t)| t.dtype().size_in_bytes());
            let path = dir.join(fname);
            save_tensors(&path, &shard, CHUNK_BYTES)?;
            for (k, t) in &shard {
                weight_map.insert(k.clone(), fname.clone());
                total += bytes(t);
            }
            written.push(path);
        }
        if names.len() > 1 {
            written.push(write_shard_index(dir, total, &weight_map)?);
        }
        let mut cfg = self.config().clone();
        let mut q = bnb_quantization_config(&nf4.unwrap_or_default(), self.dtype());
        if self.arch().family != crate::arch::Family::DeepSeek {
            // The routers (and Qwen2-MoE's shared-expert gate) are `nn.Linear` there, which
            // transformers would expect in 4-bit: they are kept dense, by module name, as
            // `llm_int8_skip_modules` tells its loader.
            q["llm_int8_skip_modules"] =
                serde_json::json!(["lm_head", "gate", "shared_expert_gate"]);
        }
        cfg.set_saved_format(Some(q), torch_dtype_name(self.dtype()));
        let p = dir.join("config.json");
        cfg.to_file(&p)?;
        written.push(p);
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeepSeekMoeConfig;
    use crate::model::LoadOptions;
    use candle_core::Device;
    use moe_peft_quant::QuantPolicy;

    #[test]
    fn quantized_save_reloads_the_same_model() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: "tempdir".into(),
            source,
        })?;
        let cfg = DeepSeekMoeConfig::tiny(96);
        for policy in [QuantPolicy::qlora(), QuantPolicy::Nf4(FourBitConfig::fp4())] {
            let opts = LoadOptions {
                quant: policy.clone(),
                ..Default::default()
            };
            let m = MoeModel::random(cfg.clone(), &opts, 5)?;
            let out = dir
                .path()
                .join(format!("{policy:?}").replace(['(', ')', ' ', ':', ','], "_"));
            let files = m.save_quantized(&out, 100_000)?;
            assert!(files.len() > 3, "sharded: {files:?}");
            let c = DeepSeekMoeConfig::from_file(out.join("config.json"))?;
            assert_eq!(
                c.quantization_config.as_ref().unwrap()["quant_method"],
                "bitsandbytes"
            );
            // Loading with a dense policy still gives the stored 4-bit weights.
            let back = MoeModel::from_pretrained(&out, &LoadOptions::default())?;
            let ids = Tensor::new(&[[1u32, 5, 9, 2, 7]], &Device::Cpu)?;
            let a = m.forward_t(&ids, None, false)?.logits;
            let b = back.forward_t(&ids, None, false)?.logits;
            let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{policy:?}");
        }
        let dense = MoeModel::random(cfg, &LoadOptions::default(), 5)?;
        let e = dense
            .save_quantized(&dir.path().join("x"), 1 << 30)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a 4-bit weight"), "{e}");
        Ok(())
    }
}
