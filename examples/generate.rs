//! `generate`: continue a prompt with a DeepSeekMoE (+ optional PEFT adapter), greedy or
//! temperature + top-p sampling, with a KV cache. The prompt is wrapped in DeepSeek's chat
//! template (`User: …\n\nAssistant:`), the reference fine-tuning template, or sent raw.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use moe_peft::data::{REFERENCE_EOT, REFERENCE_SYSTEM_PROMPT};
use moe_peft::model::{GenerateOptions, LoadOptions};

use common::parse_bool;

#[derive(Parser, Debug)]
#[command(
    name = "generate",
    about = "Generate text with a DeepSeekMoE (+ adapter)"
)]
struct Args {
    /// Local model directory.
    #[arg(long = "model_name_or_path")]
    model_name_or_path: PathBuf,
    /// Directory with the tokenizer.json (default: the model's, else the adapter's, else
    /// DeepSeek's built in).
    #[arg(long = "tokenizer")]
    tokenizer: Option<PathBuf>,
    /// PEFT adapter directory.
    #[arg(long = "adapter")]
    adapter: Option<PathBuf>,
    /// The user message (or raw text with --template raw).
    #[arg(long = "prompt")]
    prompt: String,
    /// chat (DeepSeek chat template), reference (finetune.py template) or raw.
    #[arg(long = "template", default_value = "chat")]
    template: String,
    /// Most new tokens.
    #[arg(long = "max_new_tokens", default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long = "temperature", default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long = "top_p", default_value_t = 1.0)]
    top_p: f64,
    /// Sampling seed.
    #[arg(long = "seed", default_value_t = 0)]
    seed: u64,
    /// Base precision: 4, 8, 16 or 32.
    #[arg(long = "bits", default_value_t = 16)]
    bits: u32,
    /// nf4 or fp4.
    #[arg(long = "quant_type", default_value = "nf4")]
    quant_type: String,
    /// bf16 activations.
    #[arg(long = "bf16", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    bf16: bool,
    /// Run on the CPU even when a GPU is available.
    #[arg(long = "cpu", default_value_t = false)]
    cpu: bool,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {}", common::error_text(&e));
        std::process::exit(1);
    }
}

fn run(mut args: Args) -> Result<()> {
    let device = common::select_device(args.cpu);
    eprintln!("generate: device {}", common::device_name(&device));
    let text = match args.template.as_str() {
        "chat" => format!("User: {}\n\nAssistant:", args.prompt),
        "reference" => format!(
            "{REFERENCE_SYSTEM_PROMPT}\n### Instruction:\n{}\n### Response:\n",
            moe_peft::data::py_strip(&args.prompt)
        ),
        "raw" => args.prompt.clone(),
        t => bail!("--template {t}: expected chat, reference or raw"),
    };
    common::hub_model_and_adapter(&mut args.model_name_or_path, &mut args.adapter)?;
    let scratch = std::env::temp_dir().join(format!("moe-peft-gen-{}", std::process::id()));
    let tok = common::model_tokenizer(
        args.tokenizer.as_deref(),
        &args.model_name_or_path,
        args.adapter.as_deref(),
        &scratch,
    );
    let _ = std::fs::remove_dir_all(&scratch);
    let tok = tok?;
    let opts = LoadOptions {
        dtype: common::compute_dtype(args.bf16, &device),
        device: device.clone(),
        quant: common::quant_policy(args.bits, &args.quant_type, true)?,
    };
    let loaded =
        common::load_with_adapter(&args.model_name_or_path, args.adapter.as_deref(), &opts)?;
    let model = loaded.model();
    let ids = tok.encode(&text)?;
    let mut stops = Vec::new();
    if args.template == "reference" {
        stops.push(tok.encode_raw(&format!("\n{REFERENCE_EOT}"))?);
        stops.push(tok.encode_raw(REFERENCE_EOT)?);
    }
    let gen = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        eos_token_id: tok.eos_id(),
        stop_sequences: stops,
    };
    device.synchronize()?;
    let after_load = common::pool_used_mib(&device);
    // The prompt and one token first: its time is the prefill; the rest is decoding.
    let t = Instant::now();
    model.generate(
        &ids,
        &GenerateOptions {
            max_new_tokens: 1,
            ..gen.clone()
        },
    )?;
    device.synchronize()?;
    let prefill = t.elapsed().as_secs_f64();
    moe_peft::kernels::reset_pool_peaks(&device)?;
    let t = Instant::now();
    let out = model.generate(&ids, &gen)?;
    device.synchronize()?;
    let total = t.elapsed().as_secs_f64();
    let peak = moe_peft::kernels::pool_memory(&device)?.map(|m| m.used_high as f64 / 1048576.0);
    let text = tok.decode(&out, true)?;
    let text = text.trim_end_matches(REFERENCE_EOT).trim_end();
    println!("{text}");
    // The decode rate is the run minus a prefill timed separately; for a few tokens the
    // difference is noise, so no rate is given.
    let decode_time = total - prefill;
    let decode = if out.len() >= 8 && decode_time > 0.01 {
        format!(
            "decode {:.1} tokens/s",
            (out.len() - 1) as f64 / decode_time
        )
    } else {
        "too few tokens to time the decode".into()
    };
    eprintln!(
        "({} prompt tokens, {} new tokens; prefill {:.3}s, {decode} at batch 1 with the KV cache{})",
        ids.len(),
        out.len(),
        prefill,
        match (after_load, peak) {
            (Some(a), Some(p)) => format!(
                "; GPU pool {:.2} GiB after loading, peak {:.2} GiB while generating",
                a / 1024.0,
                p / 1024.0
            ),
            _ => String::new(),
        }
    );
    Ok(())
}
