//! `random-checkpoint`: writes a randomly initialised DeepSeekMoE checkpoint in Hugging Face
//! layout (`config.json`, bf16 shards of at most 5 GB, `model.safetensors.index.json`, and
//! DeepSeek's tokenizer files), so the full-size programs can be tried without downloading the
//! 33 GB release:
//!
//! ```text
//! cargo run --release --example random-checkpoint -- --preset deepseek-moe-16b --output_dir /dev/shm/dsm16b
//! ```
//!
//! The weights are deterministic from `--seed` (HF's init: normal(0, initializer_range), norms 1,
//! router kaiming-uniform); shards are streamed, one tensor in memory at a time.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Parser;
use moe_peft::model::random::{write_random_checkpoint, RandomCheckpointOptions};
use moe_peft::model::{
    DeepSeekMoeConfig, MixtralConfig, ModelConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig,
};

#[derive(Parser, Debug)]
#[command(
    name = "random-checkpoint",
    about = "Write a random MoE checkpoint (DeepSeekMoE, Qwen-MoE, Mixtral, OLMoE) in Hugging Face layout"
)]
struct Args {
    /// `deepseek-moe-16b` (the released config), `tiny` (the demo layout, DeepSeek's
    /// vocabulary), or another family's released shapes: `qwen1.5-moe-a2.7b`, `qwen3-30b-a3b`,
    /// `mixtral-8x7b`, `olmoe-1b-7b` (DeepSeek's tokenizer is written beside every checkpoint;
    /// train those with their own, --tokenizer).
    #[arg(long = "preset")]
    preset: Option<String>,
    /// A config.json instead of a preset.
    #[arg(long = "config")]
    config: Option<PathBuf>,
    /// Where the checkpoint goes.
    #[arg(long = "output_dir")]
    output_dir: PathBuf,
    /// Seed of the weights.
    #[arg(long = "seed", default_value_t = 0)]
    seed: u64,
    /// bf16, f16 or f32.
    #[arg(long = "dtype", default_value = "bf16")]
    dtype: String,
    /// Largest shard, e.g. 5GB.
    #[arg(long = "max_shard_size", default_value = "5GB", value_parser = common::parse_size)]
    max_shard_size: usize,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {}", common::error_text(&e));
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let cfg = match (&args.config, args.preset.as_deref()) {
        (Some(_), Some(_)) => bail!("give --preset or --config, not both"),
        (Some(p), None) => {
            ModelConfig::from_file(p).with_context(|| format!("--config {}", p.display()))?
        }
        (None, Some("deepseek-moe-16b")) => DeepSeekMoeConfig::deepseek_moe_16b().into(),
        (None, Some("tiny")) => common::demo_config().into(),
        (None, Some("qwen1.5-moe-a2.7b")) => Qwen2MoeConfig::qwen1_5_moe_a2_7b().into(),
        (None, Some("qwen3-30b-a3b")) => Qwen3MoeConfig::qwen3_30b_a3b().into(),
        (None, Some("mixtral-8x7b")) => MixtralConfig::mixtral_8x7b().into(),
        (None, Some("olmoe-1b-7b")) => OlmoeConfig::olmoe_1b_7b().into(),
        (None, Some(p)) => bail!(
            "--preset {p}: expected deepseek-moe-16b, tiny, qwen1.5-moe-a2.7b, qwen3-30b-a3b, mixtral-8x7b or olmoe-1b-7b"
        ),
        (None, None) => bail!("--preset NAME (deepseek-moe-16b, tiny, qwen1.5-moe-a2.7b, qwen3-30b-a3b, mixtral-8x7b, olmoe-1b-7b) or --config FILE is required"),
    };
    let dtype = match args.dtype.as_str() {
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        "f32" | "float32" => DType::F32,
        d => bail!("--dtype {d}: expected bf16, f16 or f32"),
    };
    if args.max_shard_size == 0 {
        bail!("--max_shard_size must be positive");
    }
    let t = Instant::now();
    let rep = write_random_checkpoint(
        &cfg,
        &args.output_dir,
        &RandomCheckpointOptions {
            seed: args.seed,
            dtype,
            max_shard_bytes: args.max_shard_size,
        },
    )
    .with_context(|| format!("--output_dir {}", args.output_dir.display()))?;
    std::fs::write(
        args.output_dir.join("tokenizer.json"),
        common::TOKENIZER_JSON,
    )?;
    std::fs::write(
        args.output_dir.join("tokenizer_config.json"),
        common::TOKENIZER_CONFIG,
    )?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "wrote {} parameters ({:.2} GB of {:?}) in {} shard(s) to {} in {:.1}s ({:.2} GB/s)",
        rep.parameters,
        rep.bytes as f64 / 1e9,
        dtype,
        rep.shards.len(),
        args.output_dir.display(),
        secs,
        rep.bytes as f64 / 1e9 / secs.max(1e-9)
    );
    Ok(())
}
