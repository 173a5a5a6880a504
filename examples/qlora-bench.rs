//! `qlora-bench`: times QLoRA training steps of a MoE model at full size (random weights built
//! directly on the device, NF4 + double quantization, LoRA r=64/α=16 on all seven projection
//! types including every expert, AdamW, clipping 0.3, gradient checkpointing) and prints step
//! time, tokens/s, peak device memory, per-phase times and MFU.
//!
//! `--preset 16b` (default on a GPU) is DeepSeekMoE-16B; `--preset tiny` (default on the CPU)
//! is the small layout CI runs; `qwen1.5-moe-a2.7b`, `qwen3-30b-a3b`, `mixtral-8x7b` and
//! `olmoe-1b-7b` are those models' shapes; `--config config.json` takes any supported config.
//!
//! FLOPs counted per token (and printed): matmul FLOPs of the forward, 2·(active projection
//! parameters + lm_head) + 4·layers·seq·(heads·head_dim) for attention scores and values (the full
//! square, as eager attention computes it); a training step is counted as three forwards
//! (forward, recompute, input-gradient backward) plus the LoRA weight gradients
//! (2·r·(in+out) per adapter and token). MFU divides by the device's dense bf16 peak
//! (`--peak_tflops`, 989 for an H100/H200 SXM).

mod common;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Parser;
use moe_peft::data::{DataConfig, InstructionDataset, LoaderConfig, PreprocessConfig};
use moe_peft::lora::{LoraConfig, LoraModel, TargetModules, TrainBatch, TrainConfig, Trainer};
use moe_peft::model::{
    DeepSeekMoeConfig, LoadOptions, MixtralConfig, ModelConfig, MoeModel, OlmoeConfig,
    Qwen2MoeConfig, Qwen3MoeConfig,
};
use moe_peft::quant::QuantPolicy;
use rand::{Rng, SeedableRng};
use rand_distr::Distribution;

use common::parse_bool;

#[derive(Parser, Debug)]
#[command(
    name = "qlora-bench",
    about = "Time QLoRA training steps of DeepSeekMoE",
    rename_all = "snake_case"
)]
struct Args {
    /// 16b, tiny, or another family's shapes: qwen1.5-moe-a2.7b, qwen3-30b-a3b, mixtral-8x7b,
    /// olmoe-1b-7b (default: 16b on a GPU, tiny on the CPU).
    #[arg(long)]
    preset: Option<String>,
    /// A config.json instead of a preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 64)]
    lora_r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// Also train embed_tokens and lm_head in full (the recipe's modules_to_save).
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    modules_to_save: bool,
    /// 4 (NF4+DQ), 8 or 16.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Gradient checkpointing.
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    gradient_checkpointing: bool,
    /// With gradient checkpointing, the last N decoder layers keep their activations instead of
    /// being recomputed in backward (0: recompute all).
    #[arg(long, default_value_t = 0)]
    keep_activations_layers: usize,
    /// Synchronize between phases and report their times.
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    profile: bool,
    /// AdamW moments in bf16.
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    bf16_moments: bool,
    /// Accumulate gradients in bf16 (half their memory).
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    bf16_grads: bool,
    /// The optimizer: adamw_torch, adamw_8bit or paged_adamw_8bit.
    #[arg(long, default_value = "adamw_torch")]
    optim: moe_peft::lora::Optim,
    /// Take long sequences' attention in causal query chunks that skip the keys a chunk cannot
    /// see (false: the full square, to measure the difference).
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    causal_chunks: bool,
    /// Dequantize each projection type of the routed experts in one launch (false: one launch
    /// per expert, to measure the difference).
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    batched_dequant: bool,
    /// In training, make each MoE layer's dispatch, experts and combine one graph node (false:
    /// three, to measure the difference).
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    routed_node: bool,
    /// The experts' weight gradients in one launch of the segmented kernel where the experts
    /// average few rows (false: always cuBLAS's grouped GEMM, one launch per expert, to
    /// measure the difference).
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    tn_kernel: bool,
    /// Keep the adapter weights in bf16 (needs an 8-bit --optim: stochastic rounding).
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    bf16_adapters: bool,
    /// Full fine-tuning instead of LoRA: every weight trained (the reference's `--use_lora
    /// False`; needs --bits 16), in bf16 with --bf16_adapters (then an 8-bit --optim).
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    full: bool,
    /// Dense bf16 peak of the device in TFLOP/s, for MFU.
    #[arg(long, default_value_t = 989.0)]
    peak_tflops: f64,
    /// Run on the CPU.
    #[arg(long, default_value_t = false)]
    cpu: bool,
    /// First time a square bf16 matmul of this size (the device's practical ceiling); 0 skips.
    #[arg(long, default_value_t = 0)]
    matmul_probe: usize,
    /// Routed experts through the fused hand-written backward (false: autograd per expert).
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    fused_experts: bool,
    /// Time the pieces of one MoE layer before the steps.
    #[arg(long, default_value_t = false)]
    profile_layer: bool,
    /// Bracket this step (1-based) with cuProfilerStart/Stop, for `ncu --profile-from-start off`.
    #[arg(long)]
    cuda_profiler_step: Option<usize>,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Train on packed rows of this Open-Platypus style file (parquet, JSONL, JSON) instead of
    /// uniformly random token ids: the rows, template, tokenization and packing of
    /// `qlora-train --packing`, so the two can be compared on the same input. Tokens/s then
    /// counts real (non-pad) tokens.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Directory with the tokenizer.json for --data (default: DeepSeek's, built in).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// With --data: pack examples into full rows (true, as `qlora-train --packing True`) or
    /// pad each batch of examples to its longest (false, the reference's batches of real
    /// lengths). Tokens/s counts real tokens either way.
    #[arg(long, value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    packing: bool,
    /// Without --data: draw token ids from a Zipf law of this exponent over the vocabulary
    /// (rank k has probability ∝ 1/k^s, ranks shuffled over the ids) instead of uniformly, so
    /// that some tokens, and the experts they route to, are hot, as in text (0: uniform).
    #[arg(long, default_value_t = 0.0)]
    zipf: f64,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {}", common::error_text(&e));
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let device = common::select_device(args.cpu);
    let preset = args.preset.clone().unwrap_or_else(|| {
        if device.is_cpu() {
            "tiny".into()
        } else {
            "16b".into()
        }
    });
    let cfg: ModelConfig = match (&args.config, preset.as_str()) {
        (Some(p), _) => {
            ModelConfig::from_file(p).with_context(|| format!("--config {}", p.display()))?
        }
        (None, "16b") => DeepSeekMoeConfig::deepseek_moe_16b().into(),
        (None, "tiny") => {
            // With --data, DeepSeek's vocabulary, so that every token id has an embedding.
            let mut c = DeepSeekMoeConfig::tiny(if args.data.is_some() { 102_400 } else { 1024 });
            c.max_position_embeddings = 4096;
            c.into()
        }
        (None, "qwen1.5-moe-a2.7b") => Qwen2MoeConfig::qwen1_5_moe_a2_7b().into(),
        (None, "qwen3-30b-a3b") => Qwen3MoeConfig::qwen3_30b_a3b().into(),
        (None, "mixtral-8x7b") => MixtralConfig::mixtral_8x7b().into(),
        (None, "olmoe-1b-7b") => OlmoeConfig::olmoe_1b_7b().into(),
        (None, p) => bail!(
            "--preset {p}: expected 16b, tiny, qwen1.5-moe-a2.7b, qwen3-30b-a3b, mixtral-8x7b or olmoe-1b-7b"
        ),
    };
    let arch = cfg.arch()?;
    let targets = arch.family.default_targets();
    if args.batch_size == 0 || args.seq_len < 2 || args.steps == 0 {
        bail!("--batch_size ≥ 1, --seq_len ≥ 2 and --steps ≥ 1 are needed");
    }
    let dtype = common::compute_dtype(true, &device);
    let quant = common::quant_policy(args.bits, "nf4", true)?;
    println!(
        "qlora-bench: {} on {}, {}×{} tokens, LoRA r={} α={} on {:?}, base {}, dtype {:?}",
        preset,
        common::device_name(&device),
        args.batch_size,
        args.seq_len,
        args.lora_r,
        args.lora_alpha,
        targets,
        match &quant {
            QuantPolicy::None => "dense".to_string(),
            q => format!("{q:?}"),
        },
        dtype
    );
    let probe_tflops = if args.matmul_probe > 0 {
        let n = args.matmul_probe;
        let dt = if device.is_cuda() {
            candle_core::DType::BF16
        } else {
            candle_core::DType::F32
        };
        let a = candle_core::Tensor::randn(0f32, 1.0, (n, n), &device)?.to_dtype(dt)?;
        let b = candle_core::Tensor::randn(0f32, 1.0, (n, n), &device)?.to_dtype(dt)?;
        let _ = a.matmul(&b)?;
        device.synchronize()?;
        let reps = 10;
        let t = Instant::now();
        for _ in 0..reps {
            let _ = a.matmul(&b)?;
        }
        device.synchronize()?;
        let tf = 2.0 * (n as f64).powi(3) * reps as f64 / t.elapsed().as_secs_f64() / 1e12;
        println!("matmul probe: {n}×{n}×{n} {dt:?}: {tf:.1} TFLOP/s");
        Some(tf)
    } else {
        None
    };
    let watch = common::MemoryWatch::start(device.is_cuda());
    let t = Instant::now();
    let opts = LoadOptions {
        dtype,
        device: device.clone(),
        quant,
    };
    let model = MoeModel::random(cfg.clone(), &opts, 0)?;
    device.synchronize()?;
    let build_s = t.elapsed().as_secs_f64();
    let lcfg = LoraConfig {
        r: args.lora_r,
        lora_alpha: args.lora_alpha,
        lora_dropout: 0.1,
        target_modules: Some(TargetModules::List(
            targets.iter().map(|s| s.to_string()).collect(),
        )),
        modules_to_save: args
            .modules_to_save
            .then(|| vec!["embed_tokens".into(), "lm_head".into()]),
        ..Default::default()
    };
    let adapter_dtype = if args.bf16_adapters {
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    };
    moe_peft::lora::set_batched_dequantization(args.batched_dequant);
    moe_peft::model::ops::set_routed_node(args.routed_node);
    moe_peft::kernels::grouped::set_tn_kernel(args.tn_kernel);
    moe_peft::model::ops::set_causal_attention_chunks(args.causal_chunks);
    let mut lora = if args.full {
        if args.bits != 16 {
            bail!("--full trains every weight: it needs --bits 16 (a quantized base is frozen)");
        }
        LoraModel::full_finetune_in(model, 0, adapter_dtype)?
    } else {
        LoraModel::with_adapter_dtype(model, lcfg.clone(), 0, adapter_dtype)?
    };
    lora.set_fused_experts(args.fused_experts);
    let n_lora = lora.num_trainable_parameters();
    println!(
        "built in {build_s:.1}s: {} parameters, {} trainable, {} adapters",
        arch.num_parameters(),
        n_lora,
        lora.adapters().len()
    );
    if args.profile_layer {
        profile_layer(&lora, &args, &device)?;
    }
    let tcfg = TrainConfig {
        learning_rate: 2e-5,
        max_grad_norm: 0.3,
        warmup_steps: 1,
        max_steps: args.warmup + args.steps,
        gradient_checkpointing: args.gradient_checkpointing,
        keep_activations_layers: args.keep_activations_layers,
        profile: args.profile,
        bf16_moments: args.bf16_moments,
        bf16_grads: args.bf16_grads,
        optim: args.optim,
        ..Default::default()
    };
    let mut trainer = Trainer::new(lora, tcfg)?;
    device.synchronize()?;
    if let Some(m) = moe_peft::kernels::pool_memory(&device)? {
        println!(
            "memory pool after setup: {:.0} MiB in use (base, adapters, optimizer state), {:.0} MiB reserved",
            m.used as f64 / 1048576.0,
            m.reserved as f64 / 1048576.0
        );
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let n = args.batch_size * args.seq_len;
    let vocab = arch.vocab_size as u32;
    let mut loader = match &args.data {
        Some(path) => {
            let scratch = std::env::temp_dir().join("qlora-bench");
            let (tok, _) = common::load_tokenizer(args.tokenizer.as_deref(), &scratch)?;
            if tok.vocab_size() > arch.vocab_size {
                bail!(
                    "--data: the tokenizer has {} tokens but the model only {} embeddings",
                    tok.vocab_size(),
                    arch.vocab_size
                );
            }
            let data = DataConfig {
                preprocess: PreprocessConfig {
                    max_len: Some(args.seq_len),
                    ..Default::default()
                },
                ..Default::default()
            };
            let dataset = InstructionDataset::load(std::slice::from_ref(path), &tok, &data)
                .with_context(|| format!("--data {}", path.display()))?;
            let lc = LoaderConfig::default()
                .batch_size(args.batch_size)
                .seed(42)
                .epochs(None)
                .packing(args.packing.then_some(args.seq_len));
            println!(
                "data: {} examples from {}, {}",
                dataset.len(),
                path.display(),
                if args.packing {
                    format!("packed into rows of {}", args.seq_len)
                } else {
                    format!(
                        "{} per batch, padded to the longest (at most {})",
                        args.batch_size, args.seq_len
                    )
                }
            );
            Some(dataset.loader(lc)?)
        }
        None => None,
    };
    if !(args.zipf >= 0.0 && args.zipf.is_finite()) {
        bail!("--zipf {}: must be ≥ 0", args.zipf);
    }
    if args.zipf > 0.0 && args.data.is_some() {
        bail!("--zipf draws random token ids; it does not apply to --data");
    }
    let zipf = if args.zipf > 0.0 && loader.is_none() {
        use rand::seq::SliceRandom;
        let law = rand_distr::Zipf::new(vocab as f64, args.zipf)
            .map_err(|e| anyhow::anyhow!("--zipf {}: {e}", args.zipf))?;
        let mut rank_to_id: Vec<u32> = (0..vocab).collect();
        rank_to_id.shuffle(&mut rng);
        println!(
            "token ids: Zipf law with exponent {} over {vocab} ids (the most frequent id is {:.2} % of all)",
            args.zipf,
            100.0 / (1..=vocab as u64).map(|k| (k as f64).powf(-args.zipf)).sum::<f64>()
        );
        Some((law, rank_to_id))
    } else {
        None
    };
    let mut results = Vec::new();
    for step in 0..args.warmup + args.steps {
        let batch = match loader.as_mut() {
            Some(l) => {
                let b = l.next_batch().context("the data loader ran dry")?;
                common::to_train_batch(&b, &device)?
            }
            None => {
                let ids: Vec<u32> = match &zipf {
                    Some((law, rank_to_id)) => (0..n)
                        .map(|_| {
                            rank_to_id[(law.sample(&mut rng) as usize).clamp(1, vocab as usize) - 1]
                        })
                        .collect(),
                    None => (0..n).map(|_| rng.random_range(0..vocab)).collect(),
                };
                let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
                TrainBatch::from_host(
                    &ids,
                    &vec![1; n],
                    &labels,
                    args.batch_size,
                    args.seq_len,
                    &device,
                )?
            }
        };
        let profiled = args.cuda_profiler_step == Some(step + 1);
        if profiled {
            device.synchronize()?;
            moe_peft::kernels::cuda_profiler(&device, true)?;
        }
        let m = trainer.step(&[batch])?;
        if profiled {
            device.synchronize()?;
            moe_peft::kernels::cuda_profiler(&device, false)?;
        }
        let timed = step >= args.warmup;
        println!(
            "{} step {}: {:.3}s, {:.0} tokens/s, loss {:.4}, grad-norm {:.3}{}",
            if timed { "timed" } else { "warm-up" },
            step + 1,
            m.seconds,
            m.tokens_per_second,
            m.loss,
            m.grad_norm,
            m.phases
                .as_ref()
                .map(|p| format!(
                    " [forward {:.3}s, head {:.3}s, backward {:.3}s, optimizer {:.3}s; pool peaks {:.0}/{:.0}/{:.0}/{:.0} MiB]",
                    p.forward, p.head, p.backward, p.optimizer,
                    p.peak_mib[0], p.peak_mib[1], p.peak_mib[2], p.peak_mib[3]
                ))
                .unwrap_or_default()
        );
        if timed {
            results.push(m);
        }
    }
    let peak_mib = watch.finish();
    let mut secs: Vec<f64> = results.iter().map(|m| m.seconds).collect();
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    // Real tokens per second (every position with random ids; non-pad ones with --data).
    let mut rates: Vec<f64> = results
        .iter()
        .map(|m| m.tokens as f64 / m.seconds.max(1e-9))
        .collect();
    rates.sort_by(f64::total_cmp);
    let tps = rates[rates.len() / 2];
    // FLOPs per token.
    let h = arch.hidden_size as f64;
    let (q, kv) = (arch.q_width() as f64, arch.kv_width() as f64);
    let mut fwd = 2.0 * arch.vocab_size as f64 * h; // lm_head
    let mut lora_fwd = 0.0;
    let r = args.lora_r as f64;
    for i in 0..arch.num_hidden_layers {
        let attn = 2.0 * h * q + 2.0 * h * kv;
        fwd += 2.0 * attn + 4.0 * args.seq_len as f64 * q;
        lora_fwd += 2.0 * r * (2.0 * (h + q) + 2.0 * (h + kv));
        let mlp = |w: f64| 3.0 * h * w;
        let lora_mlp = |w: f64| 2.0 * r * 3.0 * (h + w);
        if arch.is_moe_layer(i) {
            let k = arch.top_k as f64;
            let e = arch.moe_intermediate_size as f64;
            fwd += 2.0 * (k * mlp(e) + arch.num_experts as f64 * h);
            lora_fwd += k * lora_mlp(e);
            if let Some(w) = arch.shared_intermediate {
                fwd += 2.0 * mlp(w as f64);
                lora_fwd += lora_mlp(w as f64);
            }
        } else {
            fwd += 2.0 * mlp(arch.intermediate_size as f64);
            lora_fwd += lora_mlp(arch.intermediate_size as f64);
        }
    }
    // Full fine-tuning: every projection's weight gradient too (one more forward's worth).
    let per_token = if args.full {
        4.0 * fwd
    } else {
        3.0 * (fwd + lora_fwd) + lora_fwd
    };
    let tflops = per_token * tps / 1e12;
    let mfu = tflops / args.peak_tflops;
    println!(
        "flops/token: {:.2} GFLOP (forward {:.2}, LoRA forward {:.3})",
        per_token / 1e9,
        fwd / 1e9,
        lora_fwd / 1e9
    );
    println!(
        "RESULT median step {median:.3}s, {tps:.0} tokens/s, {tflops:.1} TFLOP/s, MFU {:.1}% of {} TFLOP/s, peak device memory {}",
        100.0 * mfu,
        args.peak_tflops,
        peak_mib.map(|m| format!("{m} MiB ({:.1} GiB)", m as f64 / 1024.0)).unwrap_or_else(|| "n/a (CPU)".into())
    );
    if let Some(p) = &args.json {
        let v = serde_json::json!({
            "preset": preset, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "lora_r": args.lora_r, "bits": args.bits, "modules_to_save": args.modules_to_save,
            "keep_activations_layers": args.keep_activations_layers,
            "optim": args.optim.name(), "bf16_adapters": args.bf16_adapters, "full": args.full,
            "batched_dequant": args.batched_dequant, "causal_chunks": args.causal_chunks,
            "routed_node": args.routed_node, "tn_kernel": args.tn_kernel,
            "bf16_moments": args.bf16_moments, "bf16_grads": args.bf16_grads,
            "data": args.data, "packing": args.packing, "zipf": args.zipf,
            "median_step_s": median, "tokens_per_s": tps, "tflops": tflops, "mfu": mfu,
            "peak_mib": peak_mib, "build_s": build_s, "steps": results,
            "flops_per_token": per_token, "trainable_parameters": n_lora,
            "matmul_probe_tflops": probe_tflops,
        });
        std::fs::write(p, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("--json {}", p.display()))?;
    }
    Ok(())
}

/// Median seconds of `f` over `reps` runs, synchronizing the device around each.
fn time_it(device: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        v.push(t.elapsed().as_secs_f64());
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// Times the pieces of one MoE decoder layer (layer 1) at the benchmark's batch shape.
fn profile_layer(lora: &LoraModel, args: &Args, device: &Device) -> Result<()> {
    use candle_core::{DType, Tensor, Var};
    use moe_peft::model::MoeOrMlp;
    let model = lora.model();
    let (b, s) = (args.batch_size, args.seq_len);
    let h = model.arch().hidden_size;
    let dt = model.dtype();
    let x = Tensor::randn(0f32, 1.0, (b, s, h), device)?.to_dtype(dt)?;
    let ms = |t: f64| format!("{:.3} ms", t * 1e3);
    let tiny = Tensor::zeros(1024, DType::F32, device)?;
    let per_op = time_it(device, 5, || {
        let mut t = tiny.clone();
        for _ in 0..100 {
            t = (t + 1.0)?;
        }
        Ok(())
    })? / 100.0;
    println!("profile: one tiny elementwise op {}", ms(per_op));
    let layer = &model.layers[1];
    let MoeOrMlp::Moe(moe) = &layer.mlp else {
        bail!("layer 1 is not a MoE layer")
    };
    let site = &moe.experts[0].gate_proj;
    let xe = Tensor::randn(
        0f32,
        1.0,
        (b * s * moe.gate.top_k() / moe.experts.len(), h),
        device,
    )?
    .to_dtype(dt)?;
    let base = site
        .as_any()
        .downcast_ref::<moe_peft::lora::LoraLinear>()
        .map(|l| l.base().clone())
        .context("expert 0 gate_proj has no adapter")?;
    let t = time_it(device, 20, || {
        let _ = base.dense_weight(dt)?;
        Ok(())
    })?;
    println!("profile: dequantize one expert projection {}", ms(t));
    let w = base.dense_weight(dt)?;
    let t = time_it(device, 20, || {
        let _ = xe.matmul(&w.t()?)?;
        Ok(())
    })?;
    println!(
        "profile: one expert GEMM {:?}x{:?} {}",
        xe.dims(),
        w.dims(),
        ms(t)
    );
    let t = time_it(device, 20, || {
        let _ = base.forward_t(&xe, true)?;
        Ok(())
    })?;
    println!(
        "profile: frozen NF4 projection forward (dequantize + GEMM) {}",
        ms(t)
    );
    let t = time_it(device, 20, || {
        let _ = site.forward_t(&xe, true)?;
        Ok(())
    })?;
    println!("profile: LoRA projection forward (train) {}", ms(t));
    let ctx = model.context(b, s, 0, None, true)?;
    // One normalized input for the attention and MoE timings below (values do not matter).
    let xn = layer.post_attention_layernorm.forward(&x)?;
    let t = time_it(device, 3, || {
        let _ = layer.self_attn.forward(&xn, &ctx, None)?;
        Ok(())
    })?;
    println!("profile: attention forward {}", ms(t));
    let x2 = xn.reshape((b * s, h))?;
    let t = time_it(device, 3, || {
        let _ = moe.gate.route(&x2)?;
        Ok(())
    })?;
    println!("profile: router {}", ms(t));
    let t = time_it(device, 3, || {
        let _ = moe.forward(&xn, &ctx)?;
        Ok(())
    })?;
    // The MoE block piece by piece (as Moe::forward runs it).
    {
        use moe_peft::model::ops::{combine_rows, dispatch_rows};
        use moe_peft::model::Dispatch;
        let k = moe.gate.top_k();
        let r = moe.gate.route(&x2)?;
        let tt = time_it(device, 3, || {
            let flat: Vec<u32> = r.topk_idx.flatten_all()?.to_vec1()?;
            let _ = Dispatch::new(flat, moe.experts.len())?;
            Ok(())
        })?;
        println!("profile:   moe: top-k ids to host + grouping {}", ms(tt));
        let flat: Vec<u32> = r.topk_idx.flatten_all()?.to_vec1()?;
        let d = Dispatch::new(flat, moe.experts.len())?;
        let order = Tensor::new(d.order.as_slice(), device)?;
        let inverse = Tensor::new(d.inverse.as_slice(), device)?;
        let src: Vec<u32> = d.order.iter().map(|&p| p / k as u32).collect();
        let src = Tensor::new(src.as_slice(), device)?;
        let tt = time_it(device, 3, || {
            let _ = dispatch_rows(&x2, &src, &inverse, k)?;
            Ok(())
        })?;
        println!("profile:   moe: dispatch rows {}", ms(tt));
        let xs = dispatch_rows(&x2, &src, &inverse, k)?;
        let f = moe.experts_forward.as_ref().context("no fused experts")?;
        let tt = time_it(device, 3, || {
            let _ = f.forward(&moe.experts, &xs, &d.counts, true)?;
            Ok(())
        })?;
        println!("profile:   moe: routed experts (fused) {}", ms(tt));
        let moe_peft::model::ExpertsOutput::Computed(ys) =
            f.forward(&moe.experts, &xs, &d.counts, true)?
        else {
            anyhow::bail!("the fused expert path declined this layer");
        };
        let tt = time_it(device, 3, || {
            let _ = combine_rows(&ys, &r.topk_weight, &inverse, &order)?;
            Ok(())
        })?;
        println!("profile:   moe: weight + combine {}", ms(tt));
        if let Some(sh) = &moe.shared_experts {
            let tt = time_it(device, 3, || {
                let _ = sh.forward(&x2, true)?;
                Ok(())
            })?;
            println!("profile:   moe: shared experts {}", ms(tt));
        }
    }
    println!(
        "profile: MoE block forward (router, dispatch, {} experts, combine, shared) {}",
        moe.experts.len(),
        ms(t)
    );
    let t = time_it(device, 3, || {
        let _ = layer.forward(&x, &ctx, None)?;
        Ok(())
    })?;
    println!("profile: decoder layer forward {}", ms(t));
    let g = Tensor::randn(0f32, 1.0, (b, s, h), device)?.to_dtype(dt)?;
    let t = time_it(device, 3, || {
        let xv = Var::from_tensor(&x)?;
        let out = layer.forward(xv.as_tensor(), &ctx, None)?;
        let obj = moe_peft::model::ops::seed_gradient(&out.hidden, &g)?;
        drop(lora.backward(&obj)?);
        Ok(())
    })?;
    println!("profile: decoder layer recompute + backward {}", ms(t));
    let t = time_it(device, 3, || {
        let xv = Var::from_tensor(&x)?;
        let ctx_nograd = model.context(b, s, 0, None, true)?;
        let a = layer.self_attn.forward(
            &layer.input_layernorm.forward(xv.as_tensor())?,
            &ctx_nograd,
            None,
        )?;
        let gs = moe_peft::model::ops::seed_gradient(&a, &g)?.backward()?;
        drop(gs);
        Ok(())
    })?;
    println!("profile: attention forward + backward {}", ms(t));
    Ok(())
}
