//! PEFT adapter files (`adapter_model.safetensors` + `adapter_config.json`) and merged
//! Hugging Face exports (sharded safetensors + index + config), written atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use moe_peft_model::io::{
    plan_shards, shard_file_names, torch_dtype_name, write_shard_index, SafetensorsWriter,
    TensorSpec,
};
use moe_peft_model::{MoeModel, WeightRef};

use crate::config::LoraConfig;
use crate::error::{Error, Result};
use crate::inject::{LoraModel, TrainMode, PEFT_PREFIX};
use crate::layer::TrainableLinear;

/// File name of PEFT adapter weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// File name of the PEFT adapter config.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    sync_file(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

use moe_peft_model::io::tmp_path;

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Saves tensors as safetensors (with `{"format": "pt"}` metadata, keys sorted) atomically,
/// streaming: device tensors reach the host a few hundred MB at a time, each element once.
pub fn save_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let list: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    moe_peft_model::io::save_tensors(path, &list, crate::adamw::HOST_CHUNK_BYTES)?;
    Ok(())
}

/// A model file of a HF checkpoint: `model.safetensors`, a shard, or the shard index.
fn is_model_file(name: &str) -> bool {
    name.starts_with("model") && name.contains(".safetensors")
}

/// Removes the model files in `dir` other than `keep`: a model written there before, with
/// another number of shards, must not be read back beside a new one.
fn remove_model_files(dir: &Path, keep: &[String]) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if is_model_file(&n) && !keep.contains(&n) {
            std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(())
}

impl LoraModel {
    /// Saves what training changes into `dir`: the PEFT adapter for LoRA, or for full
    /// fine-tuning a HF checkpoint (shards of at most 5 GB + `config.json`), every weight in the
    /// dtype it is trained in (f32, or bf16 for the large ones with bf16 weights), so that a
    /// resumed run continues from exactly these values.
    pub fn save_trainable(&self, dir: &Path) -> Result<()> {
        match self.mode() {
            TrainMode::Lora => self.save_adapter(dir, DType::F32),
            TrainMode::Full => {
                let dtype = self
                    .model()
                    .lm_head
                    .as_any()
                    .downcast_ref::<TrainableLinear>()
                    .map_or(DType::F32, |t| t.var().dtype());
                let opts = ExportOptions {
                    dtype,
                    native_dtypes: true,
                    ..Default::default()
                };
                remove_model_files(dir, &[])?;
                export_hf(self.model(), dir, &opts).map(|_| ())
            }
        }
    }

    /// Puts into `dir` what [`Self::save_trainable`] wrote into `checkpoint` (a checkpoint of
    /// this model's current state): hard links where both are on one file system, else
    /// copies. A final save right after a checkpoint of the same step then costs no second
    /// write of the weights. Model files of another shard count in `dir` are removed first.
    pub fn link_trainable(&self, checkpoint: &Path, dir: &Path) -> Result<()> {
        let wanted = |n: &str| match self.mode() {
            TrainMode::Lora => n == ADAPTER_WEIGHTS || n == ADAPTER_CONFIG,
            TrainMode::Full => is_model_file(n) || n == "config.json",
        };
        let mut files: Vec<String> = std::fs::read_dir(checkpoint)
            .map_err(|e| Error::io(checkpoint, e))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| wanted(n))
            .collect();
        files.sort();
        let complete = match self.mode() {
            TrainMode::Lora => files.len() == 2,
            TrainMode::Full => {
                files.iter().any(|n| n == "config.json") && files.iter().any(|n| n != "config.json")
            }
        };
        if !complete {
            return Err(Error::Checkpoint {
                path: checkpoint.display().to_string(),
                reason: "holds no saved adapter or model to take the final files from".into(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        if self.mode() == TrainMode::Full {
            remove_model_files(dir, &files)?;
        }
        for n in &files {
            let (src, dst) = (checkpoint.join(n), dir.join(n));
            moe_peft_model::io::link_or_copy_file(&src, &dst).map_err(|e| Error::Checkpoint {
                path: dst.display().to_string(),
                reason: format!("linking or copying {}: {e}", src.display()),
            })?;
        }
        Ok(())
    }

    /// Restores what [`Self::save_trainable`] wrote.
    pub fn load_trainable(&mut self, dir: &Path) -> Result<()> {
        match self.mode() {
            TrainMode::Lora => self.load_adapter_weights(&dir.join(ADAPTER_WEIGHTS)),
            TrainMode::Full => {
                let ck =
                    moe_peft_model::Checkpoint::open_dir(dir).map_err(|e| Error::SafeTensors {
                        path: dir.display().to_string(),
                        reason: e.to_string(),
                    })?;
                self.load_vars(&ck, &dir.display().to_string())
            }
        }
    }

    /// The adapter tensors under their PEFT keys, in `dtype` (f32 keeps them exact).
    pub fn adapter_tensors(&self, dtype: DType) -> Result<BTreeMap<String, Tensor>> {
        self.trainable_vars()
            .into_iter()
            .map(|(k, v)| Ok((k, v.as_tensor().to_dtype(dtype)?)))
            .collect()
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir` (created if
    /// needed), each atomically, in PEFT's layout: `PeftModel.from_pretrained(base, dir)`
    /// loads it.
    pub fn save_adapter(&self, dir: &Path, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        save_safetensors(&dir.join(ADAPTER_WEIGHTS), &self.adapter_tensors(dtype)?)?;
        let mut cfg = self.config().clone();
        cfg.inference_mode = true;
        write_atomic(
            &dir.join(ADAPTER_CONFIG),
            (cfg.to_json()? + "\n").as_bytes(),
        )
    }

    /// Loads a PEFT adapter directory onto `model`: reads its config, injects adapters where
    /// it says, and fills them from `adapter_model.safetensors`. Every tensor must fit.
    pub fn from_pretrained(model: MoeModel, dir: &Path) -> Result<Self> {
        let cfg = LoraConfig::from_file(dir.join(ADAPTER_CONFIG))?;
        let mut lm = Self::new(model, cfg, 0)?;
        lm.load_adapter_weights(&dir.join(ADAPTER_WEIGHTS))?;
        Ok(lm)
    }

    /// Fills the adapters from a PEFT `adapter_model.safetensors` (adapter-name infixes such as
    /// `.default` are accepted). Missing, unexpected or mis-shaped tensors are errors.
    pub fn load_adapter_weights(&mut self, path: &Path) -> Result<()> {
        let file = path.display().to_string();
        // Read one tensor at a time (positioned reads): host memory stays near one tensor.
        let ck = moe_peft_model::Checkpoint::open_files(&[path.to_path_buf()]).map_err(|e| {
            Error::SafeTensors {
                path: file.clone(),
                reason: e.to_string(),
            }
        })?;
        self.load_vars(&ck, &file)
    }

    /// Fills every trainable variable from `ck` (named `file` in errors).
    fn load_vars(&mut self, ck: &moe_peft_model::Checkpoint, file: &str) -> Result<()> {
        let file = file.to_string();
        let dev = self.model().device().clone();
        let mut loaded: HashMap<String, String> = ck
            .names()
            .into_iter()
            .map(|k| {
                (
                    k.replace(".default.weight", ".weight")
                        .replace(".modules_to_save.default", ""),
                    k,
                )
            })
            .collect();
        for (key, var) in self.trainable_vars() {
            let stored = loaded.remove(&key).ok_or_else(|| Error::AdapterMismatch {
                file: file.clone(),
                reason: format!("tensor `{key}` is missing"),
            })?;
            let shape = ck.shape(&stored).unwrap_or_default().to_vec();
            if shape != var.dims() {
                return Err(Error::ShapeMismatch {
                    name: key,
                    file,
                    expected: var.dims().to_vec(),
                    got: shape,
                });
            }
            let t = ck.get_raw(&stored, &dev)?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        if !loaded.is_empty() {
            let mut extra: Vec<String> = loaded.into_keys().collect();
            extra.sort();
            extra.truncate(5);
            return Err(Error::AdapterMismatch {
                file,
                reason: format!("tensors the model has no place for: {extra:?}"),
            });
        }
        Ok(())
    }
}

/// Options of [`export_hf`].
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// dtype of the written weights (bf16 or f32; norms and router too).
    pub dtype: DType,
    /// Write each stored tensor (norms, routers, embeddings, …) in the dtype it is held in, and
    /// only the projections and `lm_head` in `dtype` (full fine-tuning checkpoints).
    pub native_dtypes: bool,
    /// Largest shard in bytes (transformers' default is 5 GB).
    pub max_shard_bytes: usize,
    /// Files copied next to the weights (tokenizer.json, tokenizer_config.json, …).
    pub extra_files: Vec<PathBuf>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            dtype: DType::BF16,
            native_dtypes: false,
            max_shard_bytes: 5_000_000_000,
            extra_files: Vec::new(),
        }
    }
}

/// Writes `model` as a Hugging Face checkpoint: `config.json`, `model.safetensors` or
/// `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`. Shards are
/// materialized one at a time (dequantizing/merging one weight at a time), so host memory
/// stays near one shard.
pub fn export_hf(model: &MoeModel, dir: &Path, opts: &ExportOptions) -> Result<Vec<PathBuf>> {
    if !matches!(opts.dtype, DType::BF16 | DType::F32 | DType::F16) {
        return Err(Error::InvalidConfig(format!(
            "export dtype {:?} (bf16, f16 or f32)",
            opts.dtype
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // The dtype each weight is written in.
    let dtype_of = |w: &WeightRef<'_>| match w {
        WeightRef::Tensor(t) if opts.native_dtypes => t.dtype(),
        _ => opts.dtype,
    };
    let mut all: Vec<String> = Vec::new();
    let mut sizes = Vec::new();
    model.visit_weights(&mut |name, w| {
        all.push(name.to_string());
        sizes.push(w.shape().iter().product::<usize>() * dtype_of(&w).size_in_bytes());
        Ok(())
    })?;
    let total: usize = sizes.iter().sum();
    let plan: Vec<Vec<String>> = plan_shards(&sizes, opts.max_shard_bytes)
        .into_iter()
        .map(|r| all[r].to_vec())
        .collect();
    let n = plan.len();
    let names = shard_file_names(n);
    let mut weight_map = BTreeMap::new();
    let mut written = Vec::new();
    for (i, shard) in plan.iter().enumerate() {
        let wanted: std::collections::HashSet<&String> = shard.iter().collect();
        let mut specs = Vec::with_capacity(shard.len());
        model.visit_weights(&mut |name, w| {
            if wanted.contains(&name.to_string()) {
                specs.push(TensorSpec::new(name, dtype_of(&w), &w.shape()));
            }
            Ok(())
        })?;
        let path = dir.join(&names[i]);
        let mut writer = SafetensorsWriter::create(&path, specs, None)?;
        // One weight at a time: materialized (dequantized, merged) on its device, written, dropped.
        model.visit_weights(&mut |name, w| {
            if wanted.contains(&name.to_string()) {
                let t = w.materialize(dtype_of(&w))?;
                writer.write_tensor(&t)?;
            }
            Ok(())
        })?;
        writer.finish()?;
        for k in shard {
            weight_map.insert(k.clone(), names[i].clone());
        }
        written.push(path);
    }
    if n > 1 {
        written.push(write_shard_index(dir, total, &weight_map)?);
    }
    let mut cfg = model.config().clone();
    cfg.set_saved_format(None, torch_dtype_name(opts.dtype));
    let p = dir.join("config.json");
    let text = serde_json::to_string_pretty(&cfg.to_json()?).map_err(|e| Error::json(&p, e))?;
    write_atomic(&p, (text + "\n").as_bytes())?;
    written.push(p);
    for f in &opts.extra_files {
        let Some(name) = f.file_name() else { continue };
        let to = dir.join(name);
        moe_peft_model::io::copy_file(f, &to).map_err(|e| Error::io(f, e))?;
        written.push(to);
    }
    Ok(written)
}

impl LoraModel {
    /// Merges the adapters into a copy of the base and exports it with [`export_hf`].
    pub fn export_merged(self, dir: &Path, opts: &ExportOptions) -> Result<Vec<PathBuf>> {
        let merged = self.merge_and_unload()?;
        export_hf(&merged, dir, opts)
    }
}

/// The PEFT key of an adapter tensor for a site (`which` is `lora_A` or `lora_B`).
pub fn peft_key(site: &str, which: &str) -> String {
    format!("{PEFT_PREFIX}{site}.{which}.weight")
}
