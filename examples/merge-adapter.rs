//! `merge-adapter`: fold a PEFT LoRA adapter into its base and write a Hugging Face checkpoint
//! (sharded safetensors + index + config.json + tokenizer files) that transformers loads.
//! The whole model is loaded and merged in memory on the CPU, then written shard by shard.

mod common;

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::Parser;
use moe_peft::lora::ExportOptions;
use moe_peft::model::LoadOptions;

#[derive(Parser, Debug)]
#[command(
    name = "merge-adapter",
    about = "Merge a PEFT adapter into its DeepSeekMoE base and export it"
)]
struct Args {
    /// Local base model directory.
    #[arg(long = "model_name_or_path")]
    model_name_or_path: PathBuf,
    /// PEFT adapter directory.
    #[arg(long = "adapter")]
    adapter: PathBuf,
    /// Where the merged checkpoint goes.
    #[arg(long = "output_dir")]
    output_dir: PathBuf,
    /// bf16, f16 or f32.
    #[arg(long = "dtype", default_value = "bf16")]
    dtype: String,
    /// Largest shard, e.g. 5GB.
    #[arg(long = "max_shard_size", default_value = "5GB", value_parser = common::parse_size)]
    max_shard_size: usize,
    /// Base precision while merging: 16/32 merge into the original weights; 4 merges into the
    /// NF4-dequantized weights the QLoRA adapter was trained against.
    #[arg(long = "bits", default_value_t = 32)]
    bits: u32,
    /// nf4 or fp4 (with --bits 4).
    #[arg(long = "quant_type", default_value = "nf4")]
    quant_type: String,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {}", common::error_text(&e));
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let dtype = match args.dtype.as_str() {
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        "f32" | "float32" => DType::F32,
        d => bail!("--dtype {d}: expected bf16, f16 or f32"),
    };
    if args.max_shard_size == 0 {
        bail!("--max_shard_size must be positive");
    }
    std::fs::create_dir_all(&args.output_dir)
        .map_err(|e| anyhow::anyhow!("--output_dir {}: {e}", args.output_dir.display()))?;
    let opts = LoadOptions {
        dtype: DType::F32,
        device: candle_core::Device::Cpu,
        quant: common::quant_policy(args.bits, &args.quant_type, true)?,
    };
    let loaded = common::load_with_adapter(&args.model_name_or_path, Some(&args.adapter), &opts)?;
    let common::Loaded::Adapted(lora) = loaded else {
        bail!("no adapter loaded");
    };
    let mut extra = common::tokenizer_files(&args.model_name_or_path);
    if extra.is_empty() {
        extra = common::tokenizer_files(&args.adapter);
    }
    let n = lora.adapters().len();
    let files = lora.export_merged(
        &args.output_dir,
        &ExportOptions {
            dtype,
            max_shard_bytes: args.max_shard_size,
            extra_files: extra,
        },
    )?;
    println!(
        "merged {n} adapters; wrote {} files to {}",
        files.len(),
        args.output_dir.display()
    );
    for f in files {
        println!("  {}", f.display());
    }
    Ok(())
}
