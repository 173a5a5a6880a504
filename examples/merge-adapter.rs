//! `merge-adapter`: fold a PEFT LoRA adapter into its base and write a Hugging Face checkpoint
//! (sharded safetensors + index + config.json + tokenizer files) that transformers loads.
//!
//! The merge streams: the base is read one tensor at a time, each adapted projection gets
//! `scaling · B·A` on the GPU when one is present (else on the CPU), and the result is written
//! straight into the output shards. Host memory stays near one tensor plus one adapter pair, so
//! a 16B model merges on a machine with little RAM.

mod common;

use std::path::PathBuf;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Parser;
use moe_peft::hub::RepoKind;
use moe_peft::lora::{merge_checkpoint, MergeOptions};
use moe_peft::quant::QuantPolicy;

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
    /// Double quantization of the absmax (with --bits 4; it does not change the dequantized
    /// weights much, but matches the training base exactly).
    #[arg(long = "double_quant", value_parser = common::parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    double_quant: bool,
    /// Merge on the CPU even when a GPU is available.
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
    let dtype = match args.dtype.as_str() {
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        "f32" | "float32" => DType::F32,
        d => bail!("--dtype {d}: expected bf16, f16 or f32"),
    };
    if args.max_shard_size == 0 {
        bail!("--max_shard_size must be positive");
    }
    args.model_name_or_path = common::hub_dir(
        RepoKind::Model,
        "--model_name_or_path",
        &args.model_name_or_path,
    )?;
    args.adapter = common::hub_dir(RepoKind::Adapter, "--adapter", &args.adapter)?;
    if !args.adapter.join("adapter_config.json").exists() {
        bail!(
            "--adapter {}: no adapter_config.json there (a PEFT adapter directory or a Hugging Face Hub name is expected)",
            args.adapter.display()
        );
    }
    if !args.model_name_or_path.join("config.json").exists() {
        bail!(
            "--model_name_or_path {}: no config.json there (a model directory or a Hugging Face Hub name is expected)",
            args.model_name_or_path.display()
        );
    }
    let requantize = match common::quant_policy(args.bits, &args.quant_type, args.double_quant)? {
        QuantPolicy::None => None,
        QuantPolicy::Nf4(c) => Some(c),
        QuantPolicy::Int8 => {
            bail!("--bits 8: merging into int8-rounded weights is not supported (use 4, 16 or 32)")
        }
    };
    let device = common::select_device(args.cpu);
    let mut extra = common::tokenizer_files(&args.model_name_or_path);
    if extra.is_empty() {
        extra = common::tokenizer_files(&args.adapter);
    }
    let t = Instant::now();
    let rep = merge_checkpoint(
        &args.model_name_or_path,
        &args.adapter,
        &args.output_dir,
        &MergeOptions {
            dtype,
            max_shard_bytes: args.max_shard_size,
            device: device.clone(),
            requantize,
            extra_files: extra,
        },
    )
    .with_context(|| {
        format!(
            "merging {} into {}",
            args.adapter.display(),
            args.model_name_or_path.display()
        )
    })?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "merged {} adapters (+{} replaced tensors) on {} in {secs:.1}s: {:.2} GB in {} files to {} ({:.2} GB/s), peak host RSS {:.2} GB",
        rep.merged_sites,
        rep.replaced,
        common::device_name(&device),
        rep.bytes as f64 / 1e9,
        rep.files.len(),
        args.output_dir.display(),
        rep.bytes as f64 / 1e9 / secs.max(1e-9),
        common::peak_rss_bytes().unwrap_or(0) as f64 / 1e9
    );
    for f in rep.files {
        println!("  {}", f.display());
    }
    Ok(())
}
