//! `evaluate`: mean causal-LM loss of a base model (+ optional PEFT adapter) on an instruction
//! dataset, preprocessed exactly as for training. Prints one JSON object on stdout:
//! `{"loss", "perplexity", "tokens", "examples"}`; everything else goes to stderr.

mod common;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use moe_peft::data::{DataConfig, InstructionDataset, LoaderConfig, PreprocessConfig, Template};
use moe_peft::model::LoadOptions;

use common::parse_bool;

#[derive(Parser, Debug)]
#[command(
    name = "evaluate",
    about = "Mean loss of a DeepSeekMoE (+ adapter) on instruction data, as JSON"
)]
struct Args {
    /// Local model directory.
    #[arg(long = "model_name_or_path")]
    model_name_or_path: PathBuf,
    /// Directory with the tokenizer.json (default: the model's, else the adapter's, else
    /// DeepSeek's built in).
    #[arg(long = "tokenizer")]
    tokenizer: Option<PathBuf>,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long = "adapter")]
    adapter: Option<PathBuf>,
    /// Data: parquet, JSONL or JSON (comma-separated).
    #[arg(long = "data_path")]
    data_path: String,
    /// Longest example in tokens.
    #[arg(long = "model_max_length", default_value_t = 512)]
    model_max_length: usize,
    /// Sequences per batch.
    #[arg(long = "per_device_eval_batch_size", default_value_t = 8)]
    batch_size: usize,
    /// Use at most this many examples.
    #[arg(long = "max_examples")]
    max_examples: Option<usize>,
    /// reference or chat.
    #[arg(long = "template", default_value = "reference")]
    template: String,
    /// Base precision: 4, 8, 16 or 32.
    #[arg(long = "bits", default_value_t = 16)]
    bits: u32,
    /// nf4 or fp4.
    #[arg(long = "quant_type", default_value = "nf4")]
    quant_type: String,
    /// Double quantization for --bits 4.
    #[arg(long = "double_quant", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    double_quant: bool,
    /// bf16 activations.
    #[arg(long = "bf16", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    bf16: bool,
    /// Run on the CPU even when a GPU is available.
    #[arg(long = "cpu", default_value_t = false)]
    cpu: bool,
    /// Evaluate without recording an autograd graph (false keeps candle's default, to measure
    /// what the graph costs).
    #[arg(long = "no_grad", value_parser = common::parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    no_grad: bool,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {}", common::error_text(&e));
        std::process::exit(1);
    }
}

fn run(mut args: Args) -> Result<()> {
    let device = common::select_device(args.cpu);
    eprintln!("evaluate: device {}", common::device_name(&device));
    let paths: Vec<PathBuf> = common::hub_data_files("--data_path", &args.data_path)?;
    common::hub_model_and_adapter(&mut args.model_name_or_path, &mut args.adapter)?;
    for p in &paths {
        if !p.exists() {
            bail!("--data_path {}: no such file or directory", p.display());
        }
    }
    let template = match args.template.as_str() {
        "reference" => Template::Reference,
        "chat" => Template::DeepSeekChat,
        t => bail!("--template {t}: expected reference or chat"),
    };
    if args.batch_size == 0 {
        bail!("--per_device_eval_batch_size must be at least 1");
    }
    let scratch = std::env::temp_dir().join(format!("moe-peft-eval-{}", std::process::id()));
    let tok = common::model_tokenizer(
        args.tokenizer.as_deref(),
        &args.model_name_or_path,
        args.adapter.as_deref(),
        &scratch,
    );
    let tok = match tok {
        Ok(t) => t,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
    };
    let opts = LoadOptions {
        dtype: common::compute_dtype(args.bf16, &device),
        device: device.clone(),
        quant: common::quant_policy(args.bits, &args.quant_type, args.double_quant)?,
    };
    let loaded =
        common::load_with_adapter(&args.model_name_or_path, args.adapter.as_deref(), &opts)?;
    let model = loaded.model();
    let cfg = DataConfig {
        preprocess: PreprocessConfig {
            template,
            max_len: Some(args.model_max_length),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut data = InstructionDataset::load(&paths, &tok, &cfg)?;
    let _ = std::fs::remove_dir_all(&scratch);
    if let Some(n) = args.max_examples {
        data.examples.truncate(n);
    }
    let n_examples = data.examples.len();
    eprintln!("{}", data.summary.to_string().trim_end());
    let mut loader = data.loader(
        LoaderConfig::default()
            .batch_size(args.batch_size)
            .shuffle(false)
            .epochs(Some(1)),
    )?;
    device.synchronize()?;
    let after_load = common::pool_used_mib(&device);
    moe_peft::kernels::reset_pool_peaks(&device)?;
    let _no_graph = args.no_grad.then(moe_peft::model::grad::no_grad);
    let t = std::time::Instant::now();
    let (mut sum, mut tokens, mut real) = (0f64, 0usize, 0usize);
    while let Some(b) = loader.next_batch() {
        let tb = common::to_train_batch(&b, &device)?;
        let (l, _) = model
            .loss(&tb.input_ids, Some(&tb.attention_mask), &tb.labels, false)
            .context("forward pass")?;
        sum += l.loss.to_scalar::<f32>()? as f64 * l.n_tokens as f64;
        tokens += l.n_tokens;
        real += b.n_tokens();
    }
    device.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    let peak = moe_peft::kernels::pool_memory(&device)?.map(|m| m.used_high as f64 / 1048576.0);
    eprintln!(
        "evaluated {real} tokens in {secs:.2}s ({:.0} tokens/s){}",
        real as f64 / secs.max(1e-9),
        match (after_load, peak) {
            (Some(a), Some(p)) => format!(
                "; GPU pool {:.2} GiB after loading, peak {:.2} GiB while evaluating ({})",
                a / 1024.0,
                p / 1024.0,
                if args.no_grad {
                    "no graph recorded"
                } else {
                    "graph recorded"
                }
            ),
            _ => String::new(),
        }
    );
    if tokens == 0 {
        bail!("no target tokens to evaluate");
    }
    let loss = sum / tokens as f64;
    println!(
        "{}",
        serde_json::json!({
            "loss": loss, "perplexity": loss.exp(), "tokens": tokens, "examples": n_examples,
            "seconds": secs, "tokens_per_second": real as f64 / secs.max(1e-9),
            "gpu_pool_after_load_mib": after_load, "gpu_pool_peak_mib": peak,
        })
    );
    if !loss.is_finite() {
        bail!("the loss is not finite ({loss}): the model or adapter holds NaN/Inf values or overflows");
    }
    Ok(())
}
