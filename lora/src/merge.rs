//! Merging a PEFT adapter into a Hugging Face checkpoint file by file, in bounded memory.
//!
//! [`merge_checkpoint`] never builds the model: it reads the base checkpoint one tensor at a
//! time (positioned reads, no memory map), adds `scaling · B·A` to each adapted projection on
//! the chosen device in f32, replaces `modules_to_save` tensors by the adapter's copies, and
//! streams the result into new shards. Host memory holds about one tensor of the base and the
//! `A`/`B` pair of one site, whatever the model size. The arithmetic is PEFT's
//! `merge_and_unload`: `W + (B @ A) · scaling` with `scaling = alpha / r` (`alpha / √r` with
//! rsLoRA) after `rank_pattern`/`alpha_pattern`.
//!
//! With `requantize`, each adapted base weight is first quantized and dequantized with the given
//! 4-bit settings, so the adapter is merged into the weights a QLoRA adapter was trained
//! against. A base saved in bitsandbytes 4-bit layout is dequantized as stored.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use moe_peft_model::io::{
    plan_shards, shard_file_names, torch_dtype_name, write_shard_index, SafetensorsWriter,
    TensorSpec,
};
use moe_peft_model::{Checkpoint, ModelConfig};
use moe_peft_quant::{FourBitConfig, FourBitTensor};

use crate::config::LoraConfig;
use crate::error::{Error, Result};
use crate::export::{write_atomic, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::inject::PEFT_PREFIX;

/// Options of [`merge_checkpoint`].
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// dtype of the merged weights (bf16, f16 or f32).
    pub dtype: DType,
    /// Largest shard in bytes.
    pub max_shard_bytes: usize,
    /// Where the arithmetic runs (a GPU when present).
    pub device: Device,
    /// Quantize and dequantize each adapted dense base weight with these 4-bit settings first.
    pub requantize: Option<FourBitConfig>,
    /// Files copied next to the weights (tokenizer files).
    pub extra_files: Vec<PathBuf>,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self {
            dtype: DType::BF16,
            max_shard_bytes: 5_000_000_000,
            device: Device::Cpu,
            requantize: None,
            extra_files: Vec::new(),
        }
    }
}

/// What [`merge_checkpoint`] did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// Projections that received `B·A`.
    pub merged_sites: usize,
    /// Tensors replaced by `modules_to_save` copies.
    pub replaced: usize,
    /// Files written.
    pub files: Vec<PathBuf>,
    /// Bytes of tensor data written.
    pub bytes: usize,
}

/// The bitsandbytes parts of a 4-bit module besides `weight`.
const BNB_PARTS: [&str; 6] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
];

/// Merges the PEFT adapter in `adapter_dir` into the checkpoint in `base_dir` and writes a
/// Hugging Face checkpoint (shards, index, `config.json`, extra files) into `out_dir`.
pub fn merge_checkpoint(
    base_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    if !matches!(opts.dtype, DType::BF16 | DType::F16 | DType::F32) {
        return Err(Error::InvalidConfig(format!(
            "merge dtype {:?} (bf16, f16 or f32)",
            opts.dtype
        )));
    }
    if opts.max_shard_bytes == 0 {
        return Err(Error::InvalidConfig(
            "max_shard_bytes must be positive".into(),
        ));
    }
    if let Some(what) = moe_peft_model::io::output_among_inputs(
        out_dir,
        &[("base model", base_dir), ("adapter", adapter_dir)],
    ) {
        return Err(Error::InvalidConfig(format!(
            "the output directory {} is the {what} directory: writing the merged model there \
             would overwrite the files being read; choose another output directory",
            out_dir.display()
        )));
    }
    let lcfg = LoraConfig::from_file(adapter_dir.join(ADAPTER_CONFIG))?;
    let mut cfg = ModelConfig::from_file(base_dir.join("config.json"))?;
    let base = Checkpoint::open_dir(base_dir)?;
    let adapter_file = adapter_dir.join(ADAPTER_WEIGHTS);
    let adapter = Checkpoint::open_files(std::slice::from_ref(&adapter_file))?;
    let afile = adapter_file.display().to_string();

    // Adapter keys by what they change: `site` → (A key, B key); base tensor → replacement.
    let mut pairs: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    let mut replace: HashMap<String, String> = HashMap::new();
    for key in adapter.names_in_storage_order() {
        let norm = key
            .replace(".default.weight", ".weight")
            .replace(".modules_to_save.default", "");
        let Some(rest) = norm.strip_prefix(PEFT_PREFIX) else {
            return Err(Error::AdapterMismatch {
                file: afile.clone(),
                reason: format!("tensor `{key}` does not start with `{PEFT_PREFIX}`"),
            });
        };
        if let Some(site) = rest.strip_suffix(".lora_A.weight") {
            pairs.entry(site.to_string()).or_default().0 = Some(key.clone());
        } else if let Some(site) = rest.strip_suffix(".lora_B.weight") {
            pairs.entry(site.to_string()).or_default().1 = Some(key.clone());
        } else {
            replace.insert(rest.to_string(), key.clone());
        }
    }
    let mut sites: HashMap<String, (String, String)> = HashMap::new();
    for (site, (a, b)) in pairs {
        match (a, b) {
            (Some(a), Some(b)) => {
                sites.insert(format!("{site}.weight"), (a, b));
            }
            _ => {
                return Err(Error::AdapterMismatch {
                    file: afile.clone(),
                    reason: format!("`{site}` has only one of lora_A / lora_B"),
                })
            }
        }
    }

    // Output tensors in storage order: plain tensors, and one `.weight` per 4-bit module.
    let is_part = |n: &str| {
        BNB_PARTS
            .iter()
            .any(|p| n.ends_with(&format!(".weight{p}")))
    };
    let names: Vec<String> = base
        .names_in_storage_order()
        .into_iter()
        .filter(|n| !is_part(n))
        .collect();
    let is_bnb = |n: &str| {
        n.strip_suffix(".weight")
            .is_some_and(|p| moe_peft_quant::bnb::is_bnb_4bit(p, &|k: &str| base.contains(k)))
    };
    let mut specs_all = Vec::with_capacity(names.len());
    for n in &names {
        let (shape, float) = if is_bnb(n) {
            (bnb_shape(&base, n)?, true)
        } else {
            let e = base.entry(n).ok_or_else(|| Error::Checkpoint {
                path: base_dir.display().to_string(),
                reason: format!("tensor `{n}` vanished"),
            })?;
            let float = matches!(
                e.dtype,
                safetensors::Dtype::F32
                    | safetensors::Dtype::BF16
                    | safetensors::Dtype::F16
                    | safetensors::Dtype::F64
            );
            (e.shape.clone(), float)
        };
        if !float {
            return Err(Error::Checkpoint {
                path: base.file_of(n),
                reason: format!("tensor `{n}` is not floating point"),
            });
        }
        specs_all.push(TensorSpec::new(n.clone(), opts.dtype, &shape));
    }
    let known: std::collections::HashSet<&String> = names.iter().collect();
    for n in sites.keys().chain(replace.keys()) {
        if !known.contains(n) {
            return Err(Error::AdapterMismatch {
                file: afile.clone(),
                reason: format!("the base checkpoint has no `{n}` for this adapter"),
            });
        }
    }

    // Shards as save_pretrained plans them.
    let sizes: Vec<usize> = specs_all.iter().map(TensorSpec::byte_len).collect();
    let plan: Vec<Vec<TensorSpec>> = plan_shards(&sizes, opts.max_shard_bytes)
        .into_iter()
        .map(|r| specs_all[r].to_vec())
        .collect();
    let n = plan.len();
    let fnames = shard_file_names(n);
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let dev = &opts.device;
    let mut report = MergeReport {
        merged_sites: 0,
        replaced: 0,
        files: Vec::new(),
        bytes: 0,
    };
    let mut weight_map = BTreeMap::new();
    for (shard, fname) in plan.iter().zip(&fnames) {
        let path = out_dir.join(fname);
        let mut w = SafetensorsWriter::create(&path, shard.clone(), None)?;
        for spec in shard {
            let name = &spec.name;
            let t = if let Some(key) = replace.get(name) {
                report.replaced += 1;
                let t = adapter.get_raw(key, dev)?;
                if t.dims() != spec.shape.as_slice() {
                    return Err(Error::ShapeMismatch {
                        name: key.clone(),
                        file: afile.clone(),
                        expected: spec.shape.clone(),
                        got: t.dims().to_vec(),
                    });
                }
                t.to_dtype(opts.dtype)?
            } else {
                let stored = is_bnb(name);
                match sites.get(name) {
                    None if stored => bnb_tensor(&base, name, dev)?.dequantize(opts.dtype)?,
                    None => base.get_raw(name, dev)?.to_dtype(opts.dtype)?,
                    Some((ka, kb)) => {
                        report.merged_sites += 1;
                        let site = name.strip_suffix(".weight").unwrap_or(name);
                        let base_w = match (&opts.requantize, stored) {
                            (_, true) => bnb_tensor(&base, name, dev)?.dequantize(DType::F32)?,
                            (Some(q), false) => {
                                FourBitTensor::quantize(&base.get_raw(name, dev)?, q)?
                                    .dequantize(DType::F32)?
                            }
                            (None, false) => base.get_raw(name, dev)?.to_dtype(DType::F32)?,
                        };
                        let a = adapter.get_raw(ka, dev)?.to_dtype(DType::F32)?;
                        let b = adapter.get_raw(kb, dev)?.to_dtype(DType::F32)?;
                        let (out, inp) = (spec.shape[0], spec.shape[1]);
                        let (r, alpha) = lcfg.rank_alpha(site);
                        if a.dims() != [r, inp] || b.dims() != [out, r] {
                            return Err(Error::ShapeMismatch {
                                name: format!("{ka} / {kb}"),
                                file: afile.clone(),
                                expected: vec![r, inp, out, r],
                                got: [a.dims(), b.dims()].concat(),
                            });
                        }
                        let delta = (b.matmul(&a)? * lcfg.scaling_for(r, alpha))?;
                        (base_w + delta)?.to_dtype(opts.dtype)?
                    }
                }
            };
            w.write_tensor(&t)?;
            report.bytes += spec.byte_len();
            weight_map.insert(name.clone(), fname.clone());
        }
        report.files.push(w.finish()?);
    }
    if report.merged_sites != sites.len() {
        return Err(Error::AdapterMismatch {
            file: afile,
            reason: format!(
                "{} of {} adapted sites were found in the base",
                report.merged_sites,
                sites.len()
            ),
        });
    }
    if n > 1 {
        report
            .files
            .push(write_shard_index(out_dir, report.bytes, &weight_map)?);
    }
    cfg.set_saved_format(None, torch_dtype_name(opts.dtype));
    let p = out_dir.join("config.json");
    let text = serde_json::to_string_pretty(&cfg.to_json()?).map_err(|e| Error::json(&p, e))?;
    write_atomic(&p, (text + "\n").as_bytes())?;
    report.files.push(p);
    for f in &opts.extra_files {
        let Some(name) = f.file_name() else { continue };
        let to = out_dir.join(name);
        moe_peft_model::io::copy_file(f, &to).map_err(|e| Error::io(f, e))?;
        report.files.push(to);
    }
    Ok(report)
}

/// The shape of the 4-bit weight `name` (`….weight`) from its quant-state JSON.
fn bnb_shape(ck: &Checkpoint, name: &str) -> Result<Vec<usize>> {
    let prefix = name.strip_suffix(".weight").unwrap_or(name);
    for qt in ["nf4", "fp4"] {
        let key = format!("{prefix}.weight.quant_state.bitsandbytes__{qt}");
        if !ck.contains(&key) {
            continue;
        }
        let bytes = ck.read_bytes(&key)?;
        let bad = |reason: String| Error::Checkpoint {
            path: ck.file_of(&key),
            reason: format!("`{key}`: {reason}"),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        return v["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
            .ok_or_else(|| bad("no integer `shape`".into()));
    }
    Err(Error::Checkpoint {
        path: ck.file_of(name),
        reason: format!("`{name}` has no bitsandbytes quant state"),
    })
}

/// The 4-bit weight of `name` (`….weight`) in bitsandbytes layout, on `device`.
fn bnb_tensor(ck: &Checkpoint, name: &str, device: &Device) -> Result<FourBitTensor> {
    let prefix = name.strip_suffix(".weight").unwrap_or(name);
    let file = ck.file_of(name);
    let get = |key: &str| -> Option<Tensor> {
        if !ck.contains(key) {
            return None;
        }
        ck.get_raw(key, device).ok()
    };
    Ok(FourBitTensor::from_bnb_tensors(prefix, &get, Some(&file))?)
}
