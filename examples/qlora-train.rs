//! `qlora-train`: LoRA / QLoRA fine-tuning of DeepSeekMoE with the flags of DeepSeek-MoE's
//! `finetune/finetune.py`, so its README command runs unchanged after the program name:
//!
//! ```text
//! cargo run --release --example qlora-train -- --model_name_or_path DIR --data_path FILE.parquet \
//!     --output_dir OUT --bf16 True --use_lora True --bits 4 --double_quant --quant_type nf4 \
//!     --lora_r 64 --lora_alpha 16 --max_grad_norm 0.3 --learning_rate 2e-5 ...
//! ```
//!
//! With no arguments it trains a tiny random DeepSeekMoE (real layout, DeepSeek's tokenizer) on
//! a built-in instruction set, on the CPU in well under a minute, and writes its adapter, the
//! base it was trained on and a merged export.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use moe_peft::data::{
    synthetic, DataConfig, InstructionDataset, LoaderConfig, LoaderState, PreprocessConfig,
    Template, TextTokenizer,
};
use moe_peft::hub::RepoKind;
use moe_peft::lora::{
    latest_checkpoint, merge_checkpoint, ExportOptions, LoraConfig, LoraModel, MergeOptions, Optim,
    Schedule, TargetModules, TrainConfig, Trainer,
};
use moe_peft::model::{Family, LoadOptions, MoeModel};
use moe_peft::quant::QuantPolicy;

use common::tensorboard::EventWriter;
use common::{parse_bool, JsonLines};

/// Flags named as the reference `finetune.py` (HfArgumentParser); defaults equal its defaults.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "qlora-train",
    // A flag given twice takes its last value, as argparse does (so a README command can be
    // run with a changed --save_steps appended).
    args_override_self = true,
    // `--max_grad_norm -1` as well as `--max_grad_norm=-1`.
    allow_negative_numbers = true,
    about = "LoRA/QLoRA fine-tuning of DeepSeekMoE (flags as DeepSeek-MoE finetune.py). Run with no arguments for a CPU demo."
)]
struct Args {
    /// Local model directory (config.json + safetensors, optionally tokenizer.json). Without
    /// it and without --data_path the built-in demo runs.
    #[arg(long = "model_name_or_path")]
    model_name_or_path: Option<PathBuf>,
    /// Training data: parquet, JSONL or JSON (comma-separated list, or a directory).
    #[arg(long = "data_path")]
    data_path: Option<String>,
    /// Where checkpoints, the final adapter and metrics go.
    #[arg(long = "output_dir")]
    output_dir: Option<PathBuf>,
    /// Epochs (fractional allowed); ignored when --max_steps > 0.
    #[arg(long = "num_train_epochs", default_value_t = 3.0)]
    num_train_epochs: f64,
    /// Total optimizer steps (-1: from epochs).
    #[arg(long = "max_steps", default_value_t = -1, allow_negative_numbers = true)]
    max_steps: i64,
    /// Longest example in tokens (right truncation).
    #[arg(long = "model_max_length", default_value_t = 512)]
    model_max_length: usize,
    /// Sequences per micro-batch.
    #[arg(long = "per_device_train_batch_size", default_value_t = 8)]
    per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long = "gradient_accumulation_steps", default_value_t = 1)]
    gradient_accumulation_steps: usize,
    /// Save every N steps (a value below 1 is a fraction of the total).
    #[arg(long = "save_steps", default_value_t = 500.0)]
    save_steps: f64,
    /// Keep at most this many checkpoints.
    #[arg(long = "save_total_limit")]
    save_total_limit: Option<usize>,
    /// `steps`, `epoch` or `no`.
    #[arg(long = "save_strategy", default_value = "steps")]
    save_strategy: String,
    /// Peak learning rate.
    #[arg(long = "learning_rate", default_value_t = 5e-5)]
    learning_rate: f64,
    /// AdamW decoupled weight decay.
    #[arg(long = "weight_decay", default_value_t = 0.0)]
    weight_decay: f64,
    /// AdamW β₁.
    #[arg(long = "adam_beta1", default_value_t = 0.9)]
    adam_beta1: f64,
    /// AdamW β₂.
    #[arg(long = "adam_beta2", default_value_t = 0.999)]
    adam_beta2: f64,
    /// AdamW ε.
    #[arg(long = "adam_epsilon", default_value_t = 1e-8)]
    adam_epsilon: f64,
    /// Warm-up steps.
    #[arg(long = "warmup_steps", default_value_t = 0)]
    warmup_steps: usize,
    /// Warm-up as a fraction of the total (used when --warmup_steps is 0).
    #[arg(long = "warmup_ratio", default_value_t = 0.0)]
    warmup_ratio: f64,
    /// Log every N steps (a value below 1 is a fraction of the total).
    #[arg(long = "logging_steps", default_value_t = 500.0)]
    logging_steps: f64,
    /// linear, cosine, constant or constant_with_warmup.
    #[arg(long = "lr_scheduler_type", default_value = "linear")]
    lr_scheduler_type: String,
    /// Recompute decoder layers in backward.
    #[arg(long = "gradient_checkpointing", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    gradient_checkpointing: bool,
    /// With --gradient_checkpointing, the last N decoder layers keep their activations instead
    /// of being recomputed in backward: faster, more GPU memory (0: recompute every layer).
    #[arg(long = "keep_activations_layers", default_value_t = 0)]
    keep_activations_layers: usize,
    /// bf16 activations and dense weights (without it: f32; the reference uses fp16 there).
    #[arg(long = "bf16", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    bf16: bool,
    /// LoRA (true) or full fine-tuning (false, the reference's default).
    #[arg(long = "use_lora", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    use_lora: bool,
    /// Frozen base precision with LoRA: 4 (NF4/FP4), 8 (int8), 16 or 32 (dense).
    #[arg(long = "bits", default_value_t = 16)]
    bits: u32,
    /// Double quantization of the 4-bit absmax.
    #[arg(long = "double_quant", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    double_quant: bool,
    /// nf4 or fp4.
    #[arg(long = "quant_type", default_value = "nf4")]
    quant_type: String,
    /// LoRA rank.
    #[arg(long = "lora_r", visible_alias = "lora_rank", default_value_t = 8)]
    lora_r: usize,
    /// LoRA alpha (scaling = alpha / r).
    #[arg(long = "lora_alpha", default_value_t = 32.0)]
    lora_alpha: f64,
    /// LoRA dropout.
    #[arg(long = "lora_dropout", default_value_t = 0.1)]
    lora_dropout: f64,
    /// Comma-separated target modules. Not given: every projection of the model's family
    /// (attention and every MLP, routed experts included: `q_proj,k_proj,v_proj,o_proj` plus
    /// `gate_proj,up_proj,down_proj`, or Mixtral's `w1,w2,w3`).
    #[arg(
        long = "trainable",
        default_value = "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"
    )]
    trainable: String,
    /// Whether `--trainable` was given (else the family's projections are targeted).
    #[arg(skip)]
    trainable_given: bool,
    /// Comma-separated modules trained in full (`none` for none).
    #[arg(long = "modules_to_save", default_value = "embed_tokens,lm_head")]
    modules_to_save: String,
    /// Clip the global gradient norm (0 disables).
    #[arg(long = "max_grad_norm", default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Seed of initialization, dropout and data order.
    #[arg(long = "seed", default_value_t = 42)]
    seed: u64,
    /// A checkpoint directory, or `True` for the newest in --output_dir. Without it the newest
    /// checkpoint is resumed unless --output_dir holds `completed` (as the reference).
    #[arg(long = "resume_from_checkpoint")]
    resume_from_checkpoint: Option<String>,
    /// Resume a checkpoint written with other training settings (data, model, LoRA shape,
    /// schedule, batch), under the new ones. Without it such a resume is refused.
    #[arg(long = "resume_with_new_settings", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    resume_with_new_settings: bool,
    /// Delete the checkpoints, metrics and `completed` marker of an earlier run in
    /// --output_dir before training (without it, a new run beside another run's checkpoints is
    /// refused).
    #[arg(long = "overwrite_output_dir", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    overwrite_output_dir: bool,
    /// Start from an existing PEFT adapter directory (its adapter_config.json decides the
    /// targets, rank and alpha) and continue training it.
    #[arg(long = "init_adapter")]
    init_adapter: Option<PathBuf>,
    /// `tensorboard`, `all` (= tensorboard) or `none`.
    #[arg(long = "report_to", default_value = "all")]
    report_to: String,
    /// Prompt template: reference (finetune.py) or chat.
    #[arg(long = "template", default_value = "reference")]
    template: String,
    /// Batch examples of similar length together.
    #[arg(long = "group_by_length", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    group_by_length: bool,
    /// Pack several examples into each row of --model_max_length tokens (TRL's `packing`):
    /// attention stays inside each example, so the loss is that of the examples alone, with
    /// almost no padding.
    #[arg(long = "packing", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    packing: bool,
    /// Also write the quantized base (bitsandbytes Linear4bit layout) to this directory after
    /// loading; passing that directory as --model_name_or_path later skips quantization.
    #[arg(long = "save_quantized")]
    save_quantized: Option<PathBuf>,
    /// AdamW moment dtype, `float32` or `bfloat16` (default: as --optim says).
    #[arg(long = "moments_dtype")]
    moments_dtype: Option<String>,
    /// Gradient accumulation buffer dtype, `float32` or `bfloat16` (default: as --optim says).
    #[arg(long = "grads_dtype")]
    grads_dtype: Option<String>,
    /// Also write the run's measurements (times, memory, tokens/s, save times) as JSON here.
    #[arg(long = "summary_json")]
    summary_json: Option<PathBuf>,
    /// Run on the CPU even when a GPU is available.
    #[arg(long = "cpu", default_value_t = false)]
    cpu: bool,
    /// In a group of several GPUs, each rank keeps the optimizer state of its share of the
    /// trained weights only (ZeRO stage 1: the state's memory divided by the group size),
    /// updates those, and broadcasts them. 8-bit optimizers only; default: on with one. Every
    /// rank then writes its share of each checkpoint into --output_dir, which must be one
    /// directory that all ranks see.
    #[arg(long = "shard_optimizer_state", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    shard_optimizer_state: Option<bool>,
    /// Accepted for compatibility; DeepSpeed is not used.
    #[arg(long = "deepspeed")]
    deepspeed: Option<String>,
    /// Accepted for compatibility; no evaluation runs during training.
    #[arg(long = "evaluation_strategy", visible_alias = "eval_strategy")]
    evaluation_strategy: Option<String>,
    /// Accepted for compatibility.
    #[arg(long = "per_device_eval_batch_size")]
    per_device_eval_batch_size: Option<usize>,
    /// Accepted for compatibility.
    #[arg(long = "cache_dir")]
    cache_dir: Option<String>,
    /// `adamw_torch` (the reference's, f32 moments and gradients), `adamw_torch_bf16` (both in
    /// bf16), `adamw_8bit` (bitsandbytes' 8-bit blockwise moments) or `paged_adamw_8bit` (the
    /// same, kept in host memory).
    #[arg(long = "optim", default_value = "adamw_torch")]
    optim: String,
    /// Dtype of the weights the optimizer updates (the LoRA adapters, or with --use_lora False
    /// the projections, embeddings and lm_head): `float32` (PEFT's default) or `bfloat16` (half
    /// the memory; needs an 8-bit --optim, which rounds stochastically).
    #[arg(long = "adapter_dtype", default_value = "float32")]
    adapter_dtype: String,
    /// Add transformers' balancing loss of the router to the loss (Qwen-MoE, Mixtral, OLMoE;
    /// as setting `model.config.output_router_logits`). Default: the config.json's value.
    #[arg(long = "output_router_logits", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    output_router_logits: Option<bool>,
    /// Weight of that loss. Default: the config.json's `router_aux_loss_coef`.
    #[arg(long = "router_aux_loss_coef")]
    router_aux_loss_coef: Option<f64>,
    /// Start this many processes, one per GPU of this host, as the ranks of one data-parallel
    /// group (as torchrun does; each rank trains on its own share of every step's
    /// micro-batches). A process started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
    /// MASTER_ADDR, MASTER_PORT set) joins that group instead. Several ranks need a build with
    /// `--features nccl`.
    #[arg(long = "nproc_per_node", default_value_t = 1)]
    nproc_per_node: usize,
    /// Port of rank 0's rendezvous for --nproc_per_node.
    #[arg(long = "master_port", default_value_t = 29500)]
    master_port: u16,
    /// Accepted for compatibility; attention is computed as the reference's eager path.
    #[arg(long = "attn_implementation")]
    attn_implementation: Option<String>,
}

impl Args {
    /// The demo's settings for every flag not given on the command line.
    fn apply_demo_defaults(&mut self, m: &clap::ArgMatches) {
        let given = |id: &str| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        if !given("use_lora") {
            self.use_lora = true;
        }
        if !given("bits") {
            self.bits = 4;
        }
        if !given("lora_r") {
            self.lora_r = 16;
        }
        if !given("lora_alpha") {
            self.lora_alpha = 32.0;
        }
        if !given("lora_dropout") {
            self.lora_dropout = 0.05;
        }
        if !given("modules_to_save") {
            self.modules_to_save = "embed_tokens,lm_head".into();
        }
        if !given("learning_rate") {
            self.learning_rate = 5e-3;
        }
        if !given("lr_scheduler_type") {
            self.lr_scheduler_type = "cosine".into();
        }
        if !given("warmup_steps") {
            self.warmup_steps = 5;
        }
        if !given("max_steps") {
            self.max_steps = DEMO_STEPS as i64;
        }
        if !given("per_device_train_batch_size") {
            self.per_device_train_batch_size = 8;
        }
        if !given("model_max_length") {
            self.model_max_length = 128;
        }
        if !given("logging_steps") {
            self.logging_steps = 10.0;
        }
        if !given("save_steps") {
            self.save_steps = 50.0;
        }
        if !given("max_grad_norm") {
            self.max_grad_norm = 0.3;
        }
        if !given("gradient_checkpointing") {
            self.gradient_checkpointing = true;
        }
    }
}

fn main() {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Args::command().get_matches();
    let mut args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    args.trainable_given =
        matches.value_source("trainable") == Some(clap::parser::ValueSource::CommandLine);
    let demo = args.model_name_or_path.is_none() && args.data_path.is_none();
    if demo {
        args.apply_demo_defaults(&matches);
    }
    if args.nproc_per_node == 0 {
        eprintln!("error: --nproc_per_node 0: at least one process is needed");
        std::process::exit(2);
    }
    if args.nproc_per_node > 1 && std::env::var_os("RANK").is_none() {
        std::process::exit(match launch_group(args.nproc_per_node, args.master_port) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {}", common::error_text(&e));
                1
            }
        });
    }
    // An output directory this run creates is removed again if the run fails before writing
    // anything of value (a scratch tokenizer is not).
    let created = args.output_dir.clone().filter(|o| !o.exists());
    match run(args, demo) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {}", common::error_text(&e));
            if let Some(o) = created {
                remove_if_only_scratch(&o);
            }
            std::process::exit(1);
        }
    }
}

/// `--nproc_per_node n`: runs this program `n` times with the same arguments, as ranks
/// `0..n` of one group on this host (torchrun's environment variables), and returns the first
/// failing rank's exit code (the others are stopped), or 0.
fn launch_group(n: usize, port: u16) -> Result<i32> {
    if !cfg!(feature = "nccl") {
        bail!("--nproc_per_node {n}: training over several processes needs a build with --features nccl (NCCL)");
    }
    // Ctrl-C reaches every rank (same process group); this process keeps waiting for them
    // to save and stop.
    let _ = ctrlc::set_handler(|| {});
    let exe = std::env::current_exe().context("finding this program to start its ranks")?;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    println!("qlora-train: starting {n} ranks (rendezvous at 127.0.0.1:{port})");
    let mut children = Vec::with_capacity(n);
    for r in 0..n {
        let child = std::process::Command::new(&exe)
            .args(&argv)
            .env("RANK", r.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("starting rank {r}"))?;
        children.push(child);
    }
    let mut code = 0;
    loop {
        let mut running = 0;
        for (r, c) in children.iter_mut().enumerate() {
            match c
                .try_wait()
                .with_context(|| format!("waiting for rank {r}"))?
            {
                Some(st) if !st.success() && code == 0 => {
                    code = st.code().unwrap_or(1);
                    eprintln!("rank {r} failed ({st}); stopping the others");
                }
                Some(_) => {}
                None => running += 1,
            }
        }
        if running == 0 {
            return Ok(code);
        }
        if code != 0 {
            for c in children.iter_mut() {
                let _ = c.kill();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Removes `dir` when it holds nothing but what a run writes before training (the scratch
/// tokenizer, the writability probe); leaves it alone otherwise.
fn remove_if_only_scratch(dir: &std::path::Path) {
    let scratch = ["tokenizer", ".write-test-0"];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.iter().all(|n| scratch.contains(&n.as_str())) {
        let _ = std::fs::remove_dir_all(dir.join("tokenizer"));
        let _ = std::fs::remove_file(dir.join(".write-test-0"));
        let _ = std::fs::remove_dir(dir);
    }
}

/// The settings that make two runs the same run: a checkpoint written under one set is resumed
/// only under the same (`--max_steps` / `--num_train_epochs` may change, to extend a run).
fn run_settings(args: &Args, model_dir: Option<&Path>) -> serde_json::Value {
    let canon = |p: &Path| {
        p.canonicalize()
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    let data: Vec<String> = args
        .data_path
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|x| !x.is_empty())
        .map(|p| canon(Path::new(p)))
        .collect();
    let mut v = serde_json::json!({
        "model_name_or_path": model_dir.map(canon),
        "data_path": data,
        "use_lora": args.use_lora,
        "bits": args.bits,
        "quant_type": args.quant_type,
        "double_quant": args.double_quant,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "trainable": args.trainable,
        "modules_to_save": args.modules_to_save,
        "init_adapter": args.init_adapter.as_deref().map(canon),
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": args.lr_scheduler_type,
        "warmup_steps": args.warmup_steps,
        "warmup_ratio": args.warmup_ratio,
        "weight_decay": args.weight_decay,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "model_max_length": args.model_max_length,
        "template": args.template,
        "packing": args.packing,
        "group_by_length": args.group_by_length,
        "optim": args.optim,
        "seed": args.seed,
    });
    // Recorded only when not the default, so that checkpoints written before the flag existed
    // still match a default run.
    if matches!(args.adapter_dtype.as_str(), "bfloat16" | "bf16") {
        v["adapter_dtype"] = serde_json::json!("bfloat16");
    }
    if let Some(o) = args.output_router_logits {
        v["output_router_logits"] = serde_json::json!(o);
    }
    if let Some(c) = args.router_aux_loss_coef {
        v["router_aux_loss_coef"] = serde_json::json!(c);
    }
    v
}

/// The fields that differ between the checkpoint's `then` and `now` (either side may lack a
/// field: settings at their default are left out of the record), as `name: then → now`.
fn settings_diff(then: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    let (Some(a), Some(b)) = (then.as_object(), now.as_object()) else {
        return vec![];
    };
    let mut keys: Vec<&String> = b.keys().chain(a.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&serde_json::Value>| v.map_or("(unset)".to_string(), |x| x.to_string());
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {} → {}", show(a.get(k)), show(b.get(k))))
        .collect()
}

/// The run settings a checkpoint was written with, if it recorded them.
fn checkpoint_settings(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join(moe_peft::lora::TRAINER_STATE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("extra")?.get("run").cloned()
}

/// The trainer's settings from the flags.
fn train_config(
    args: &Args,
    schedule: Schedule,
    total: usize,
    bf16_moments: bool,
    bf16_grads: bool,
    optim: Optim,
) -> TrainConfig {
    TrainConfig {
        learning_rate: args.learning_rate,
        weight_decay: args.weight_decay,
        adam_beta1: args.adam_beta1,
        adam_beta2: args.adam_beta2,
        adam_epsilon: args.adam_epsilon,
        // transformers clips only when max_grad_norm > 0: a negative value turns it off too.
        max_grad_norm: args.max_grad_norm.max(0.0),
        lr_scheduler_type: schedule,
        warmup_steps: args.warmup_steps,
        warmup_ratio: args.warmup_ratio,
        gradient_accumulation_steps: args.gradient_accumulation_steps,
        gradient_checkpointing: args.gradient_checkpointing,
        keep_activations_layers: args.keep_activations_layers,
        max_steps: total,
        seed: args.seed,
        bf16_moments,
        bf16_grads,
        optim,
        ..Default::default()
    }
}

/// Everything the flags alone decide, checked before the model loads and the data is tokenized
/// (minutes at 16B), each error naming its flag.
fn validate_flags(args: &Args) -> Result<()> {
    if args.keep_activations_layers > 0 && !args.gradient_checkpointing {
        bail!(
            "--keep_activations_layers {} needs --gradient_checkpointing True (without it every \
             layer keeps its activations)",
            args.keep_activations_layers
        );
    }
    let finite = |flag: &str, v: f64| -> Result<()> {
        if !v.is_finite() {
            bail!("--{flag} {v}: must be a finite number");
        }
        Ok(())
    };
    // The optimizer and schedule settings, checked by the trainer's own rules (the step count
    // is not known before the data is read: 1 stands in).
    finite("max_grad_norm", args.max_grad_norm)?;
    if let Err(e) =
        train_config(args, Schedule::Constant, 1, false, false, Optim::AdamwTorch).validate()
    {
        match e {
            moe_peft::lora::Error::InvalidTrainSetting { field, value, rule } => {
                bail!("--{field} {value}: {rule}")
            }
            other => return Err(other.into()),
        }
    }
    if args.max_steps <= 0 && !(args.num_train_epochs > 0.0 && args.num_train_epochs.is_finite()) {
        bail!(
            "--num_train_epochs {}: must be > 0 (or give --max_steps)",
            args.num_train_epochs
        );
    }
    if let Some(c) = args.router_aux_loss_coef {
        if !(0.0..=1.0).contains(&c) {
            bail!("--router_aux_loss_coef {c}: must be in [0, 1]");
        }
    }
    if args.use_lora && args.init_adapter.is_none() {
        if args.lora_r == 0 {
            bail!("--lora_r 0: the rank must be at least 1");
        }
        finite("lora_alpha", args.lora_alpha)?;
        if args.lora_alpha == 0.0 {
            bail!("--lora_alpha 0: the adapter would add nothing (its scaling alpha / r is 0)");
        }
        if !(0.0..1.0).contains(&args.lora_dropout) {
            bail!("--lora_dropout {}: must be in [0, 1)", args.lora_dropout);
        }
        for name in args
            .trainable
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
        {
            let last = name.rsplit('.').next().unwrap_or(name);
            let known: Vec<&str> = Family::ALL
                .iter()
                .flat_map(|f| f.default_targets().iter().copied())
                .fold(Vec::new(), |mut v, n| {
                    if !v.contains(&n) {
                        v.push(n);
                    }
                    v
                });
            if name != "all-linear" && !known.contains(&last) {
                bail!(
                    "--trainable {name}: not a projection of a supported model (expected a comma \
                     list of {}, or all-linear)",
                    known.join(", ")
                );
            }
        }
    }
    Ok(())
}

fn every(value: f64, total: usize) -> usize {
    if value <= 0.0 {
        0
    } else if value < 1.0 {
        ((value * total as f64).ceil() as usize).max(1)
    } else {
        value as usize
    }
}

fn run(mut args: Args, demo: bool) -> Result<i32> {
    let t0 = Instant::now();
    let launch = moe_peft::kernels::LaunchEnv::from_env(&|k| std::env::var(k).ok())?;
    let (rank, world) = launch.as_ref().map_or((0, 1), |e| (e.rank, e.world_size));
    if world > 1 && !cfg!(feature = "nccl") {
        bail!("WORLD_SIZE={world}: training over several processes needs a build with --features nccl (NCCL)");
    }
    if world > 1 && demo {
        bail!("the built-in demo runs in one process; give --model_name_or_path and --data_path to train as a group");
    }
    let device = match &launch {
        Some(e) if world > 1 => Device::new_cuda(e.local_rank)
            .with_context(|| format!("rank {rank}: CUDA device {}", e.local_rank))?,
        _ => common::select_device(args.cpu),
    };
    if world > 1 && args.cpu {
        bail!("--cpu: the ranks of a group ({world}) train on GPUs");
    }
    // The group's communicator, made first: the ranks agree on the run's start through it.
    let comm: Arc<dyn moe_peft::kernels::Communicator> = match &launch {
        #[cfg(feature = "nccl")]
        Some(e) if world > 1 => Arc::new(
            moe_peft::kernels::comm::nccl::Nccl::new(
                &device,
                e,
                std::time::Duration::from_secs(600),
            )
            .with_context(|| {
                format!(
                    "rank {rank} (LOCAL_RANK {}): joining the group",
                    e.local_rank
                )
            })?,
        ),
        _ => Arc::new(moe_peft::kernels::SingleProcess),
    };
    if world > 1 {
        println!("qlora-train: rank {rank} of {world}");
    }
    println!("qlora-train: device {}", common::device_name(&device));
    if let Some(s) = &args.evaluation_strategy {
        println!(
            "note: --evaluation_strategy {s} accepted and ignored (no evaluation during training)"
        );
    }
    if args.per_device_eval_batch_size.is_some() {
        println!("note: --per_device_eval_batch_size accepted and ignored");
    }
    if args.cache_dir.is_some() || args.attn_implementation.is_some() {
        println!("note: --cache_dir / --attn_implementation accepted and ignored");
    }
    let (optim, bf16_state) = match args.optim.as_str() {
        "adamw_torch_bf16" => (Optim::AdamwTorch, true),
        o => match o.parse::<Optim>() {
            Ok(opt) => (opt, false),
            Err(_) => bail!(
                "--optim {o}: expected adamw_torch (the reference's), adamw_torch_bf16 (bf16 \
                 moments and gradients), adamw_8bit or paged_adamw_8bit"
            ),
        },
    };
    let shard_state = match args.shard_optimizer_state {
        Some(true) if !optim.is_8bit() => bail!(
            "--shard_optimizer_state True needs --optim adamw_8bit or paged_adamw_8bit (not {})",
            args.optim
        ),
        Some(s) => s,
        None => optim.is_8bit(),
    } && world > 1;
    if let Some(d) = &args.deepspeed {
        // The ZeRO stage the config asks for, if the file is there to read.
        let stage = std::fs::read_to_string(d)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["zero_optimization"]["stage"].as_u64())
            .map_or("its ZeRO stage unread".to_string(), |s| {
                format!("ZeRO stage {s}")
            });
        println!(
            "note: --deepspeed {d} ({stage}) accepted and mapped to data parallelism over {world} \
             rank(s) {}; DeepSpeed itself is not used",
            if shard_state {
                "with the optimizer state sharded over the ranks (stage 1)"
            } else {
                "in which every rank holds the whole optimizer state (stage 0)"
            }
        );
    }
    let adapter_dtype = match args.adapter_dtype.as_str() {
        "float32" | "fp32" | "f32" => DType::F32,
        "bfloat16" | "bf16" => DType::BF16,
        o => bail!("--adapter_dtype {o}: expected float32 or bfloat16"),
    };
    if adapter_dtype == DType::BF16 && !optim.is_8bit() {
        bail!(
            "--adapter_dtype bfloat16 needs --optim adamw_8bit or paged_adamw_8bit (they update \
             bf16 weights by stochastic rounding; {} keeps f32 weights)",
            args.optim
        );
    }

    if optim.is_8bit() && args.moments_dtype.is_some() {
        bail!(
            "--moments_dtype: {} keeps 8-bit moments (leave the flag out)",
            args.optim
        );
    }
    let state_dtype = |flag: &str, v: &Option<String>| -> Result<bool> {
        Ok(match v.as_deref() {
            None => bf16_state,
            Some("float32" | "fp32" | "f32") => false,
            Some("bfloat16" | "bf16") => true,
            Some(o) => bail!("--{flag} {o}: expected float32 or bfloat16"),
        })
    };
    let bf16_moments = state_dtype("moments_dtype", &args.moments_dtype)?;
    let bf16_grads = state_dtype("grads_dtype", &args.grads_dtype)?;
    let schedule = Schedule::from_name(&args.lr_scheduler_type).with_context(|| {
        format!(
            "--lr_scheduler_type {}: expected linear, cosine, constant or constant_with_warmup",
            args.lr_scheduler_type
        )
    })?;
    let save_strategy = args.save_strategy.as_str();
    if !matches!(save_strategy, "steps" | "epoch" | "no") {
        bail!("--save_strategy {save_strategy}: expected steps, epoch or no");
    }
    let report_tb = match args.report_to.as_str() {
        "tensorboard" | "all" => true,
        "none" => false,
        other => {
            println!("note: --report_to {other} is not available; writing metrics.jsonl only");
            false
        }
    };
    let template = match args.template.as_str() {
        "reference" => Template::Reference,
        "chat" => Template::DeepSeekChat,
        t => bail!("--template {t}: expected reference or chat"),
    };
    if !args.use_lora && args.bits < 16 {
        bail!("--bits {} needs --use_lora True (the reference asserts bits in [16, 32] for full fine-tuning)", args.bits);
    }
    if args.per_device_train_batch_size == 0 || args.gradient_accumulation_steps == 0 {
        bail!("--per_device_train_batch_size and --gradient_accumulation_steps must be at least 1");
    }
    validate_flags(&args)?;
    // Hugging Face Hub names become directories and files of the HF cache (fetched as needed)
    // before anything is written; the adapter records the name as given, as PEFT does.
    let base_model_name = args
        .model_name_or_path
        .as_ref()
        .map(|p| p.display().to_string());
    if let Some(m) = &args.model_name_or_path {
        args.model_name_or_path =
            Some(common::hub_dir(RepoKind::Model, "--model_name_or_path", m)?);
    }
    if let Some(a) = &args.init_adapter {
        args.init_adapter = Some(common::hub_dir(RepoKind::Adapter, "--init_adapter", a)?);
    }
    if let Some(d) = &args.data_path {
        let files = common::hub_data_files("--data_path", d)?;
        args.data_path = Some(
            files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    let policy = if args.use_lora {
        common::quant_policy(args.bits, &args.quant_type, args.double_quant)?
    } else {
        QuantPolicy::None
    };
    let dtype = common::compute_dtype(args.bf16, &device);

    let out = match (&args.output_dir, demo) {
        (Some(o), _) => o.clone(),
        (None, true) => std::env::temp_dir().join("moe-peft-demo"),
        (None, false) => bail!("--output_dir is required"),
    };
    if let Some(m) = &args.model_name_or_path {
        if let Some(what) =
            moe_peft::model::io::output_among_inputs(&out, &[("--model_name_or_path", m)])
        {
            bail!(
                "--output_dir {} is the {what} directory {}: checkpoints and the adapter would \
                 overwrite the model being read; choose another output directory",
                out.display(),
                m.display()
            );
        }
    }
    if let Some(d) = &args.save_quantized {
        let model = args.model_name_or_path.as_deref();
        if moe_peft::model::io::same_path(d, &out)
            || model.is_some_and(|m| moe_peft::model::io::same_path(d, m))
        {
            bail!(
                "--save_quantized {} is the output or the model directory: choose a directory \
                 of its own",
                d.display()
            );
        }
    }
    if demo && args.output_dir.is_none() && out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(&out)
        .with_context(|| format!("--output_dir {}: cannot create", out.display()))?;
    let probe = out.join(format!(".write-test-{rank}"));
    std::fs::write(&probe, b"")
        .with_context(|| format!("--output_dir {}: not writable", out.display()))?;
    let _ = std::fs::remove_file(&probe);
    // Rank 0 writes the run's files; the other ranks keep theirs (scratch tokenizer, metrics,
    // events) apart and write no checkpoint or model.
    let lead = rank == 0;
    let wout = if lead {
        out.clone()
    } else {
        out.join(format!(".rank-{rank}"))
    };
    std::fs::create_dir_all(&wout).with_context(|| format!("creating {}", wout.display()))?;

    // Data paths are checked before the (possibly long) model load.
    let data_paths: Vec<PathBuf> = match (&args.data_path, demo) {
        (Some(p), _) => p
            .split(',')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect(),
        (None, true) => vec![],
        (None, false) => bail!(
            "--data_path is required (parquet, JSONL or JSON with `instruction` and `output`)"
        ),
    };
    for p in &data_paths {
        if !p.exists() {
            bail!("--data_path {}: no such file or directory", p.display());
        }
    }

    // Model.
    let opts = LoadOptions {
        dtype,
        device: device.clone(),
        quant: policy.clone(),
    };
    let mut load_seconds = 0.0;
    let mut summary = serde_json::json!({});
    let gpu_watch = common::MemoryWatch::start(device.is_cuda());
    let (model, model_dir): (MoeModel, Option<PathBuf>) = if demo {
        let cfg = common::demo_config();
        // The dense base is written out so that evaluate/generate/merge-adapter can use it.
        let dense = MoeModel::random(
            cfg.clone(),
            &LoadOptions {
                quant: QuantPolicy::None,
                ..opts.clone()
            },
            args.seed,
        )?;
        let base_dir = out.join("base");
        let (_, tok_dir) = common::load_tokenizer(None, &out)?;
        moe_peft::lora::export_hf(
            &dense,
            &base_dir,
            &ExportOptions {
                dtype: DType::F32,
                extra_files: common::tokenizer_files(&tok_dir),
                ..Default::default()
            },
        )?;
        std::fs::remove_dir_all(&tok_dir).ok();
        drop(dense);
        println!(
            "demo: tiny random DeepSeekMoE ({} parameters: {} layers, {} routed experts top-{}, {} shared) written to {}",
            cfg.num_parameters(),
            cfg.num_hidden_layers,
            cfg.routed_experts(),
            cfg.num_experts_per_tok.unwrap_or(0),
            cfg.n_shared_experts.unwrap_or(0),
            base_dir.display()
        );
        (MoeModel::from_pretrained(&base_dir, &opts)?, Some(base_dir))
    } else {
        let dir = args
            .model_name_or_path
            .clone()
            .unwrap_or_else(|| "deepseek-ai/deepseek-moe-16b".into());
        let t = Instant::now();
        let m = common::load_model(&dir, &opts)?;
        device.synchronize()?;
        load_seconds = t.elapsed().as_secs_f64();
        println!(
            "loaded {} in {load_seconds:.1}s (host RSS now {:.2} GB, peak {:.2} GB)",
            dir.display(),
            common::rss_bytes().unwrap_or(0) as f64 / 1e9,
            common::peak_rss_bytes().unwrap_or(0) as f64 / 1e9
        );
        (m, Some(dir))
    };
    if let Some(q) = args.save_quantized.as_ref().filter(|_| lead) {
        let t = Instant::now();
        let files = model
            .save_quantized(q, 5_000_000_000)
            .with_context(|| format!("--save_quantized {}", q.display()))?;
        if let Some(d) = &model_dir {
            for f in common::tokenizer_files(d) {
                if let Some(name) = f.file_name() {
                    moe_peft::model::io::copy_file(&f, &q.join(name))
                        .with_context(|| format!("copying {} to {}", f.display(), q.display()))?;
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let bytes = common::dir_bytes(q);
        println!(
            "saved the quantized base ({} files, {:.2} GB) to {} in {secs:.1}s ({:.2} GB/s)",
            files.len(),
            bytes as f64 / 1e9,
            q.display(),
            bytes as f64 / 1e9 / secs.max(1e-9)
        );
        summary["save_quantized"] = serde_json::json!({"seconds": secs, "bytes": bytes});
    }
    let mut model = model;
    if args.output_router_logits.is_some() || args.router_aux_loss_coef.is_some() {
        model
            .set_switch_aux(args.output_router_logits, args.router_aux_loss_coef)
            .context("--output_router_logits / --router_aux_loss_coef")?;
    }
    println!(
        "model: {} {} parameters ({}), dtype {:?}, base {}",
        model.arch().family.model_type(),
        model.arch().num_parameters(),
        match model.arch().aux {
            moe_peft::model::AuxLoss::None => "no balancing loss".to_string(),
            moe_peft::model::AuxLoss::DeepSeek { alpha, .. } => {
                format!("DeepSeekMoE balancing loss, alpha {alpha}")
            }
            moe_peft::model::AuxLoss::Switch { coef } => {
                format!("router balancing loss, coef {coef}")
            }
        },
        dtype,
        match &policy {
            QuantPolicy::None => "dense".to_string(),
            p => format!("{p:?}"),
        }
    );

    // Tokenizer and data.
    let (tok, tok_dir) = common::load_tokenizer(model_dir.as_deref(), &wout)?;
    if tok.vocab_size() > model.arch().vocab_size {
        bail!(
            "the tokenizer has {} tokens but the model only {} embeddings",
            tok.vocab_size(),
            model.arch().vocab_size
        );
    }
    let pre = PreprocessConfig {
        template,
        max_len: Some(args.model_max_length),
        ..Default::default()
    };
    let dataset = if demo {
        let records = synthetic::tiny_instruct(512, 0);
        println!(
            "demo data: {} built-in instruction records (copy, reverse, sort, add, count …)",
            records.len()
        );
        InstructionDataset::from_records(&records, &tok, &pre)?
    } else {
        InstructionDataset::load(
            &data_paths,
            &tok,
            &DataConfig {
                preprocess: pre,
                ..Default::default()
            },
        )?
    };
    println!("{}", dataset.summary.to_string().trim_end());
    let loader_cfg = LoaderConfig::default()
        .batch_size(args.per_device_train_batch_size)
        .seed(args.seed)
        .epochs(None)
        .group_by_length(args.group_by_length)
        .packing(args.packing.then_some(args.model_max_length));
    let mut loader = dataset.loader(loader_cfg)?;
    let updates_per_epoch =
        (loader.steps_per_epoch() / (args.gradient_accumulation_steps * world)).max(1);
    let total = if args.max_steps > 0 {
        args.max_steps as usize
    } else {
        (args.num_train_epochs * updates_per_epoch as f64)
            .ceil()
            .max(1.0) as usize
    };

    // Adapters.
    let lora = if let Some(dir) = &args.init_adapter {
        if !args.use_lora {
            bail!("--init_adapter needs --use_lora True");
        }
        println!("starting from the adapter in {}", dir.display());
        LoraModel::from_pretrained(model, dir)
            .with_context(|| format!("--init_adapter {}", dir.display()))?
    } else if args.use_lora {
        let to_list = |s: &str| -> Vec<String> {
            s.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        };
        let mts = to_list(&args.modules_to_save);
        let targets = if args.trainable_given {
            to_list(&args.trainable)
        } else {
            let f = model.arch().family;
            f.default_targets().iter().map(|s| s.to_string()).collect()
        };
        let cfg = LoraConfig {
            r: args.lora_r,
            lora_alpha: args.lora_alpha,
            lora_dropout: args.lora_dropout,
            target_modules: Some(TargetModules::List(targets)),
            modules_to_save: if mts.is_empty() || mts == ["none"] {
                None
            } else {
                Some(mts)
            },
            base_model_name_or_path: if demo {
                model_dir.as_ref().map(|p| p.display().to_string())
            } else {
                base_model_name.clone()
            },
            ..Default::default()
        };
        LoraModel::with_adapter_dtype(model, cfg, args.seed, adapter_dtype)?
    } else {
        println!(
            "full fine-tuning (--use_lora False, the reference's default): every weight is trained{}",
            if adapter_dtype == DType::BF16 {
                " (projections, embeddings and lm_head in bf16, updated with stochastic rounding)"
            } else {
                ""
            }
        );
        LoraModel::full_finetune_in(model, args.seed, adapter_dtype)?
    };
    println!(
        "trainable: {} parameters in {} adapters{}",
        lora.num_trainable_parameters(),
        lora.adapters().len(),
        if lora.saved_modules().is_empty() {
            String::new()
        } else {
            format!(" + {} fully trained tensors", lora.saved_modules().len())
        }
    );
    let tcfg = train_config(&args, schedule, total, bf16_moments, bf16_grads, optim);

    // Resume.
    let resume = match args.resume_from_checkpoint.as_deref() {
        Some(s) if parse_bool(s) == Ok(true) => latest_checkpoint(&out),
        Some(s) if parse_bool(s) == Ok(false) => None,
        Some(p) => {
            let p = PathBuf::from(p);
            if !p.is_dir() {
                bail!(
                    "--resume_from_checkpoint {}: no such checkpoint directory",
                    p.display()
                );
            }
            Some(p)
        }
        None if out.join("completed").exists() => None,
        None => latest_checkpoint(&out),
    };
    // Every rank has decided from the same directory before rank 0 changes it.
    comm.barrier()?;
    let settings = run_settings(&args, model_dir.as_deref());
    match &resume {
        Some(dir) => {
            if let Some(then) = checkpoint_settings(dir) {
                let diff = settings_diff(&then, &settings);
                if !diff.is_empty() && !args.resume_with_new_settings {
                    bail!(
                        "{} was written by a run with other settings ({}); run the same \
                         command, use another --output_dir, or pass --resume_with_new_settings \
                         True to continue under the new ones",
                        dir.display(),
                        diff.join("; ")
                    );
                }
            }
        }
        None => {
            let old = moe_peft::lora::list_checkpoints(&out);
            if args.overwrite_output_dir {
                if lead {
                    for (_, d) in &old {
                        std::fs::remove_dir_all(d).with_context(|| {
                            format!("--overwrite_output_dir: removing {}", d.display())
                        })?;
                    }
                    let _ = std::fs::remove_file(out.join("metrics.jsonl"));
                    let _ = std::fs::remove_file(out.join("completed"));
                }
            } else if let Some((_, latest)) = old.last() {
                let diff = match checkpoint_settings(latest) {
                    Some(then) => settings_diff(&then, &settings),
                    None => vec!["(the checkpoint does not record its settings)".to_string()],
                };
                if !diff.is_empty() {
                    bail!(
                        "--output_dir {} holds checkpoints of another run ({}): a new run \
                         would train beside them; use another --output_dir, or pass \
                         --overwrite_output_dir True to delete them",
                        out.display(),
                        diff.join("; ")
                    );
                }
            }
        }
    }
    let mut trainer = match &resume {
        Some(dir) => {
            println!("resuming from {}", dir.display());
            let (t, extra) = Trainer::resume_in_group(lora, tcfg, dir, comm.clone(), shard_state)?;
            let then = extra
                .get("world_size")
                .and_then(|v| v.as_u64())
                .unwrap_or(1) as usize;
            if then != world && lead {
                println!(
                    "note: {} was written by a group of {then}, this run has {world}: each step \
                     now takes {} micro-batches (the learning-rate schedule keeps its steps)",
                    dir.display(),
                    args.gradient_accumulation_steps * world
                );
            }
            if let Some(state) = extra.get("loader") {
                let state: LoaderState = serde_json::from_value(state.clone())
                    .with_context(|| format!("{}: bad data position", dir.display()))?;
                loader.set_state(&state)?;
            }
            t
        }
        None => Trainer::new_in_group(lora, tcfg, comm.clone(), shard_state)?,
    };
    // A checkpoint that cannot fit would fail at every save: say so before training (every
    // rank of a group stops, told through the step agreement below).
    // What the run writes in the end.
    let product = if trainer.lora().mode() == moe_peft::lora::TrainMode::Lora {
        "adapter"
    } else {
        "model"
    };
    let mut too_small = false;
    if lead && save_strategy != "no" {
        let need = trainer.checkpoint_bytes();
        if let Ok(free) = fs2::available_space(&out) {
            too_small = free < need;
            if too_small {
                let msg = format!(
                    "--output_dir {}: {:.2} GB free, but each checkpoint takes about {:.2} GB \
                     (trained weights and optimizer state); free some space, choose another \
                     --output_dir, or pass --save_strategy no (the final {} is then the only \
                     save)",
                    out.display(),
                    free as f64 / 1e9,
                    need as f64 / 1e9,
                    product
                );
                if world == 1 {
                    bail!(msg);
                }
                // In a group, rank 0 says why; every rank stops below.
                eprintln!("error: {msg}");
            }
        }
    }
    if world > 1 {
        // Every rank resumed the same step (and rank 0 found room for checkpoints).
        let mut v = [
            trainer.global_step() as f64,
            if too_small { 1.0 } else { 0.0 },
        ];
        comm.all_reduce_host(&mut v)?;
        if v[1] > 0.0 {
            bail!(
                "rank {rank}: --output_dir {} cannot hold a checkpoint (rank 0 says how much \
                 space it needs)",
                out.display()
            );
        }
        if v[0] != (trainer.global_step() * world) as f64 {
            bail!(
                "rank {rank} resumed at step {} but the group does not agree: the ranks saw different checkpoints in {}",
                trainer.global_step(),
                out.display()
            );
        }
    }

    println!(
        "training: {} steps × {} micro-batches of {} (lr {:e}, {} schedule, warm-up {}, clip {})",
        total,
        args.gradient_accumulation_steps,
        args.per_device_train_batch_size,
        args.learning_rate,
        args.lr_scheduler_type,
        trainer.config().warmup(),
        args.max_grad_norm
    );

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    // A resumed run redoes the steps after its checkpoint: their old rows go.
    common::drop_rows_after_step(&wout.join("metrics.jsonl"), trainer.global_step())?;
    // No `completed` until this run has finished (a crash must leave a resumable directory).
    let _ = std::fs::remove_file(wout.join("completed"));
    let mut metrics = JsonLines::open(&wout.join("metrics.jsonl"))?;
    let mut tb = if report_tb {
        Some(EventWriter::create(&wout.join("runs"))?)
    } else {
        None
    };
    let save_every = every(args.save_steps, total);
    let log_every = every(args.logging_steps, total).max(1);
    let bar = if lead {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.global_step() as u64);
    let mut curve: Vec<(usize, f64)> = Vec::new();
    let mut last_saved = trainer.global_step();
    // The checkpoint written at `last_saved` by this run, if any.
    let mut last_checkpoint: Option<PathBuf> = None;
    let first_step_from = trainer.global_step();
    let mut steps_log: Vec<serde_json::Value> = Vec::new();
    let mut saves: Vec<serde_json::Value> = Vec::new();
    // Checkpoints that could not be written (training went on).
    let mut failed_saves: Vec<serde_json::Value> = Vec::new();
    let (mut real_total, mut padded_total) = (0usize, 0usize);
    println!(
        "ready to train after {:.1}s (host RSS {:.2} GB, peak {:.2} GB{})",
        t0.elapsed().as_secs_f64(),
        common::rss_bytes().unwrap_or(0) as f64 / 1e9,
        common::peak_rss_bytes().unwrap_or(0) as f64 / 1e9,
        common::pool_used_mib(&device)
            .map(|m| format!(", GPU pool {:.2} GiB", m / 1024.0))
            .unwrap_or_default()
    );
    let extra = |loader: &moe_peft::data::Loader| {
        serde_json::json!({
            "run": settings,
            "world_size": world,
            "loader": loader.state(),
            "epoch": loader.state().steps as f64 / loader.steps_per_epoch().max(1) as f64,
        })
    };
    while trainer.global_step() < total {
        // Every rank reads the whole step's micro-batches and keeps its share (the j-th goes to
        // rank j mod world), so the data position is the same on every rank.
        let mut micro = Vec::with_capacity(args.gradient_accumulation_steps);
        for j in 0..args.gradient_accumulation_steps * world {
            let b = loader.next_batch().context("the data loader ran dry")?;
            if j % world == rank {
                micro.push(common::to_train_batch(&b, &device)?);
            }
        }
        let epoch_before = loader.epoch();
        let m = match trainer.step(&micro) {
            Ok(m) => m,
            Err(e) => {
                bar.abandon();
                let last = latest_checkpoint(&out)
                    .map(|p| format!("the last checkpoint, {}, is intact", p.display()))
                    .unwrap_or_else(|| "no checkpoint had been written yet".into());
                bail!("{}; {last}", common::error_text(&anyhow::Error::from(e)));
            }
        };
        if m.step == first_step_from + 1 {
            let since = t0.elapsed().as_secs_f64();
            println!(
                "first step done {since:.1}s after start ({:.1}s of it the step itself)",
                m.seconds
            );
            summary["first_step_done_s"] = serde_json::json!(since);
            summary["first_step_s"] = serde_json::json!(m.seconds);
        }
        real_total += m.tokens;
        padded_total += m.padded_tokens;
        steps_log.push(serde_json::json!({
            "step": m.step, "seconds": m.seconds, "tokens": m.tokens,
            "padded_tokens": m.padded_tokens, "loss": m.loss,
        }));
        let epoch = loader.state().steps as f64 / loader.steps_per_epoch().max(1) as f64;
        let mut rec = serde_json::to_value(&m)?;
        rec["epoch"] = serde_json::json!(epoch);
        metrics.write(&rec)?;
        if let Some(tb) = tb.as_mut() {
            tb.scalar("train/loss", m.step, m.loss)?;
            tb.scalar("train/aux_loss", m.step, m.aux_loss)?;
            tb.scalar("train/learning_rate", m.step, m.learning_rate)?;
            tb.scalar("train/grad_norm", m.step, m.grad_norm)?;
            tb.scalar("train/tokens_per_second", m.step, m.tokens_per_second)?;
        }
        curve.push((m.step, m.loss));
        bar.set_position(m.step as u64);
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} gnorm {:.3} {:.0} tok/s",
            m.loss, m.learning_rate, m.grad_norm, m.tokens_per_second
        ));
        if m.step % log_every == 0 {
            say(&bar, format!(
                "step {:>6}  epoch {epoch:.2}  loss {:.4}  aux {:.5}  lr {:.3e}  grad_norm {:.4}  {:.0} tok/s  ({:.1}% padding, {:.2}s)",
                m.step, m.loss, m.aux_loss, m.learning_rate, m.grad_norm, m.tokens_per_second,
                100.0 * (1.0 - m.tokens as f64 / m.padded_tokens.max(1) as f64), m.seconds
            ));
        }
        let epoch_end = loader.epoch() != epoch_before;
        let save_now = match save_strategy {
            "steps" => save_every > 0 && m.step % save_every == 0,
            "epoch" => epoch_end,
            _ => false,
        };
        // Whether to stop after this step, decided once: in a group every rank takes the same
        // decision (one rank's Ctrl-C stops them all; a signal arriving later counts next step).
        let mut stop = interrupted.load(Ordering::SeqCst);
        if world > 1 {
            let mut v = [if stop { 1.0 } else { 0.0 }];
            trainer.communicator().all_reduce_host(&mut v)?;
            stop = v[0] > 0.0;
        }
        // With sharded optimizer state every rank writes its share (rank 0 the rest). A
        // checkpoint that fails (a full disk, …) is reported and training goes on: the next
        // save tries again, and the trained weights are not lost.
        let mut failed_save: Option<String> = None;
        if !lead && shard_state && (save_now || stop) {
            match trainer.save_checkpoint(&out, extra(&loader), args.save_total_limit) {
                Ok(_) => last_saved = m.step,
                Err(e) => failed_save = Some(e.to_string()),
            }
        }
        if lead && (save_now || stop) {
            let t = Instant::now();
            match trainer.save_checkpoint(&out, extra(&loader), args.save_total_limit) {
                Ok(p) => {
                    let secs = t.elapsed().as_secs_f64();
                    let bytes = common::dir_bytes(&p);
                    last_saved = m.step;
                    last_checkpoint = Some(p.clone());
                    say(
                        &bar,
                        format!(
                            "saved {} ({:.2} GB in {secs:.1}s, {:.2} GB/s)",
                            p.display(),
                            bytes as f64 / 1e9,
                            bytes as f64 / 1e9 / secs.max(1e-9)
                        ),
                    );
                    saves
                        .push(serde_json::json!({"step": m.step, "seconds": secs, "bytes": bytes}));
                }
                Err(e) => {
                    say(
                        &bar,
                        format!(
                            "warning: the checkpoint of step {} failed: {e}; training goes on \
                             and the next save tries again",
                            m.step
                        ),
                    );
                    failed_saves.push(serde_json::json!({"step": m.step, "error": e.to_string()}));
                    failed_save = Some(e.to_string());
                }
            }
        }
        if stop {
            bar.abandon();
            if !lead {
                let _ = std::fs::remove_dir_all(&wout);
            }
            if let Some(e) = failed_save {
                bail!(
                    "interrupted at step {}, but its checkpoint failed ({e}); the newest earlier \
                     checkpoint in {} is where the same command resumes",
                    m.step,
                    out.display()
                );
            }
            if lead || shard_state {
                println!(
                    "interrupted at step {}: checkpoint saved; run the same command again to \
                     resume",
                    m.step
                );
            } else {
                println!(
                    "interrupted at step {}: rank 0 writes the checkpoint",
                    m.step
                );
            }
            return Ok(130);
        }
    }
    bar.finish();
    if !lead && shard_state && last_saved != trainer.global_step() && save_strategy != "no" {
        // A failure is rank 0's to report; the model is written either way.
        let _ = trainer.save_checkpoint(&out, extra(&loader), args.save_total_limit);
    }
    if !lead {
        // The other ranks are done: rank 0 writes the model.
        let _ = std::fs::remove_dir_all(&wout);
        return Ok(0);
    }
    if last_saved != trainer.global_step() && save_strategy != "no" {
        let t = Instant::now();
        match trainer.save_checkpoint(&out, extra(&loader), args.save_total_limit) {
            Ok(p) => {
                last_saved = trainer.global_step();
                last_checkpoint = Some(p.clone());
                let secs = t.elapsed().as_secs_f64();
                let bytes = common::dir_bytes(&p);
                println!(
                    "saved {} ({:.2} GB in {secs:.1}s, {:.2} GB/s)",
                    p.display(),
                    bytes as f64 / 1e9,
                    bytes as f64 / 1e9 / secs.max(1e-9)
                );
                saves.push(serde_json::json!(
                    {"step": trainer.global_step(), "seconds": secs, "bytes": bytes}
                ));
            }
            Err(e) => {
                // The final adapter or model below is still written.
                println!(
                    "warning: the checkpoint of step {} failed: {e}; the final {} is written \
                     next",
                    trainer.global_step(),
                    product
                );
                failed_saves.push(
                    serde_json::json!({"step": trainer.global_step(), "error": e.to_string()}),
                );
            }
        }
    }
    let final_checkpoint = last_checkpoint.filter(|_| last_saved == trainer.global_step());
    let lora = trainer.into_lora();
    let t = Instant::now();
    // With a checkpoint of this very step, its files are the final ones: linked, not rewritten.
    let final_checkpoint = match &final_checkpoint {
        Some(ck) => match lora.link_trainable(ck, &out) {
            Ok(()) => final_checkpoint,
            Err(e) => {
                println!("note: linking the final files failed ({e}); writing them instead");
                lora.save_trainable(&out)?;
                None
            }
        },
        None => {
            lora.save_trainable(&out)?;
            None
        }
    };
    {
        let secs = t.elapsed().as_secs_f64();
        // The adapter files, or the model's (one file or shards and their index).
        let bytes = std::fs::read_dir(&out)
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().to_string();
                        n.starts_with("adapter_") || n.starts_with("model")
                    })
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum::<u64>()
            })
            .unwrap_or(0);
        let what = product;
        match &final_checkpoint {
            Some(ck) => println!(
                "wrote the final {what} ({:.2} GB, linked to the files of {} in {secs:.1}s)",
                bytes as f64 / 1e9,
                ck.display()
            ),
            None => println!(
                "wrote the final {what} ({:.2} GB in {secs:.1}s, {:.2} GB/s)",
                bytes as f64 / 1e9,
                bytes as f64 / 1e9 / secs.max(1e-9)
            ),
        }
        summary["final_save"] = serde_json::json!({
            "seconds": secs, "bytes": bytes,
            "linked_from": final_checkpoint.as_ref().map(|p| p.display().to_string()),
        });
    }
    let gpu_peak = gpu_watch.finish();
    let padding = 1.0 - real_total as f64 / padded_total.max(1) as f64;
    // Steady rate: the steps after the first of this run.
    let steady: Vec<&serde_json::Value> = steps_log.iter().skip(1).collect();
    let (st_tok, st_sec) = steady.iter().fold((0.0, 0.0), |(t, s), v| {
        (
            t + v["tokens"].as_f64().unwrap_or(0.0),
            s + v["seconds"].as_f64().unwrap_or(0.0),
        )
    });
    let steady_tps = if st_sec > 0.0 {
        st_tok / st_sec
    } else {
        f64::NAN
    };
    println!(
        "run: {} steps, padding {:.1}%, steady {:.0} real tokens/s, peak host RSS {:.2} GB{}",
        steps_log.len(),
        100.0 * padding,
        steady_tps,
        common::peak_rss_bytes().unwrap_or(0) as f64 / 1e9,
        gpu_peak
            .map(|m| format!(
                ", peak GPU memory {m} MiB ({:.1} GiB, nvidia-smi)",
                m as f64 / 1024.0
            ))
            .unwrap_or_default()
    );
    summary["load_s"] = serde_json::json!(load_seconds);
    summary["steps"] = serde_json::json!(steps_log);
    summary["saves"] = serde_json::json!(saves);
    summary["failed_saves"] = serde_json::json!(failed_saves);
    summary["padding_fraction"] = serde_json::json!(padding);
    summary["steady_tokens_per_s"] = serde_json::json!(steady_tps);
    summary["peak_host_rss_bytes"] = serde_json::json!(common::peak_rss_bytes());
    summary["peak_gpu_mib"] = serde_json::json!(gpu_peak);
    summary["resumed_from"] = serde_json::json!(resume.as_ref().map(|p| p.display().to_string()));
    if let Some(p) = &args.summary_json {
        std::fs::write(p, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("--summary_json {}", p.display()))?;
    }
    for f in common::tokenizer_files(&tok_dir) {
        if let Some(name) = f.file_name() {
            moe_peft::model::io::copy_file(&f, &out.join(name))
                .with_context(|| format!("copying {} to {}", f.display(), out.display()))?;
        }
    }
    std::fs::write(out.join("completed"), b"")?;
    if !curve.is_empty() {
        std::fs::write(
            out.join("loss_curve.svg"),
            common::loss_svg(&curve, "training loss")?,
        )?;
    }
    let first = curve.first().map(|p| p.1);
    let last = curve.last().map(|p| p.1);
    println!(
        "done in {:.1}s: {} written to {}",
        t0.elapsed().as_secs_f64(),
        if lora.mode() == moe_peft::lora::TrainMode::Lora {
            "adapter_model.safetensors + adapter_config.json"
        } else {
            "the model's safetensors + config.json"
        },
        out.display()
    );
    if let (Some(a), Some(b)) = (first, last) {
        println!("loss {a:.4} → {b:.4} (metrics.jsonl, loss_curve.svg)");
    }
    if demo {
        // Merged into the dense base/ it started from, tensor by tensor from disk: what PEFT's
        // `merge_and_unload()` gives for base/ + this adapter (not the NF4-dequantized base the
        // adapter was trained against).
        let merged = out.join("merged");
        let report = merge_checkpoint(
            &out.join("base"),
            &out,
            &merged,
            &MergeOptions {
                dtype: DType::F32,
                extra_files: common::tokenizer_files(&tok_dir),
                ..Default::default()
            },
        )?;
        println!(
            "merged export: base/ (dense) + the adapter, as PEFT's merge_and_unload() gives it: {} files in {}",
            report.files.len(),
            merged.display()
        );
        demo_generations(&out, &opts, &tok)?;
        print_next_steps(&out);
    }
    Ok(0)
}

/// Prints above the progress bar, or plainly when the bar is hidden (not a terminal).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

/// The demo's last word: greedy answers of the base it started from and of base + adapter (as
/// `generate` loads them) to instructions of each task, so what training changed is visible.
fn demo_generations(out: &Path, opts: &LoadOptions, tok: &TextTokenizer) -> Result<()> {
    let dense = LoadOptions {
        quant: QuantPolicy::None,
        ..opts.clone()
    };
    let base = common::load_with_adapter(&out.join("base"), None, &dense)?;
    let tuned = common::load_with_adapter(&out.join("base"), Some(out), &dense)?;
    println!("demo generation (greedy, reference template): base/ → base/ + adapter");
    for instruction in DEMO_PROMPTS {
        let before = common::reference_answer(base.model(), tok, instruction, 16)?;
        let after = common::reference_answer(tuned.model(), tok, instruction, 16)?;
        // JSON strings: quoted, with line breaks and control characters escaped.
        println!(
            "  {instruction:<34} {} → {}",
            serde_json::to_string(&before)?,
            serde_json::to_string(&after)?
        );
    }
    println!(
        "  (the random base rambles; after {} steps the adapter answers in each task's format and \
         words and stops at <|EOT|>; getting the answers right takes a tiny model far longer)",
        DEMO_STEPS
    );
    Ok(())
}

/// Optimizer steps of the demo.
const DEMO_STEPS: usize = 150;

/// Instructions of four of the demo's tasks.
const DEMO_PROMPTS: [&str; 4] = [
    "Say the last word: red cat moon",
    "Say the first word: fish star lamp",
    "Sort the digits: 7 2 9 4",
    "Add the numbers: 12 + 5",
];

fn print_next_steps(out: &Path) {
    let o = out.display();
    println!("next:");
    println!("  cargo run --release --example evaluate -- --model_name_or_path {o}/merged --data_path fixtures/data/tiny_instruct.jsonl --model_max_length 128");
    println!("  cargo run --release --example generate -- --model_name_or_path {o}/base --adapter {o} --prompt 'Sort the digits: 7 2 9 4' --template reference");
}
