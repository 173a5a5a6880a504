//! End to end through the command-line programs on the tiny demo model: train → checkpoint →
//! resume → PEFT adapter → evaluate → merge → evaluate merged → generate, the reference's README
//! command line, and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/<test> → target/<profile>/examples/<name>
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let p = dir.join("examples").join(name);
    assert!(
        p.exists(),
        "{} is not built (cargo test builds the examples)",
        p.display()
    );
    p
}

fn run(name: &str, args: &[&str]) -> Output {
    Command::new(example(name))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("spawn")
}

fn ok(name: &str, args: &[&str]) -> String {
    let o = run(name, args);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{name} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

fn fails(name: &str, args: &[&str], needle: &str) {
    let o = run(name, args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{name} {args:?} should fail");
    assert!(
        err.contains(needle),
        "{name} {args:?}: stderr lacks {needle:?}:\n{err}"
    );
    assert!(
        !err.contains("panicked"),
        "{name} {args:?} panicked:\n{err}"
    );
    assert!(
        !err.contains("stack backtrace") && !err.contains("   0: "),
        "backtrace shown:\n{err}"
    );
}

fn eval_loss(args: &[&str]) -> f64 {
    let out = ok("evaluate", args);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("evaluate prints JSON");
    v["loss"].as_f64().expect("loss")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn train_resume_evaluate_merge_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let common = [
        "--max_steps",
        "12",
        "--save_steps",
        "6",
        "--report_to",
        "tensorboard",
    ];
    let mut args_a = vec!["--output_dir", s(&a)];
    args_a.extend(common);
    let out = ok("qlora-train", &args_a);
    assert!(out.contains("merged export"), "{out}");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "metrics.jsonl",
        "loss_curve.svg",
        "completed",
    ] {
        assert!(a.join(f).exists(), "{f} missing");
    }
    let svg = std::fs::read_to_string(a.join("loss_curve.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("training loss") && svg.contains("step"),
        "loss_curve.svg: {}",
        &svg[..svg.len().min(300)]
    );
    assert!(a.join("checkpoint-6").is_dir() && a.join("checkpoint-12").is_dir());
    assert!(a.join("merged/config.json").exists() && a.join("base/model.safetensors").exists());
    assert!(
        std::fs::read_dir(a.join("runs")).unwrap().count() == 1,
        "one TensorBoard event file"
    );

    // PEFT layout.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 16);
    let st = candle_core::safetensors::load(
        a.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(st.keys().all(|k| k.starts_with("base_model.model.")));
    assert!(st.contains_key("base_model.model.model.layers.2.mlp.experts.5.up_proj.lora_A.weight"));
    assert!(st.contains_key("base_model.model.model.embed_tokens.weight"));

    // Same run, interrupted after checkpoint-6 (later state removed), then resumed by running
    // the same command again: the final adapter is byte-identical.
    let mut args_b = vec!["--output_dir", s(&b)];
    args_b.extend(common);
    ok("qlora-train", &args_b);
    for f in [
        "checkpoint-12",
        "completed",
        "adapter_model.safetensors",
        "adapter_config.json",
    ] {
        let p = b.join(f);
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }
    let out = ok("qlora-train", &args_b);
    assert!(
        out.contains("resuming from") && out.contains("checkpoint-6"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(a.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(b.join("adapter_model.safetensors")).unwrap(),
        "resumed run ends with a different adapter"
    );
    let ma = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let mb = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let loss = |m: &str, step: u64| -> f64 {
        m.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .rfind(|v| v["step"] == step)
            .unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    for step in 7..=12 {
        assert_eq!(loss(&ma, step), loss(&mb, step), "step {step}");
    }

    // Evaluate: the adapter lowers the loss; merged = adapter.
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/data/tiny_instruct.jsonl"
    );
    let base = a.join("base");
    let e = [
        "--data_path",
        data,
        "--model_max_length",
        "128",
        "--bits",
        "4",
    ];
    let mut base_args = vec!["--model_name_or_path", s(&base)];
    base_args.extend(e);
    let l_base = eval_loss(&base_args);
    let mut ad_args = base_args.clone();
    ad_args.extend(["--adapter", s(&a)]);
    let l_adapter = eval_loss(&ad_args);
    assert!(
        l_adapter < l_base - 1.0,
        "adapter {l_adapter} vs base {l_base}"
    );
    let merged = tmp.path().join("merged");
    ok(
        "merge-adapter",
        &[
            "--model_name_or_path",
            s(&base),
            "--adapter",
            s(&a),
            "--output_dir",
            s(&merged),
            "--bits",
            "4",
            "--dtype",
            "f32",
            "--max_shard_size",
            "20MB",
        ],
    );
    assert!(
        merged.join("model.safetensors.index.json").exists(),
        "sharded export"
    );
    let l_merged = eval_loss(&[
        "--model_name_or_path",
        s(&merged),
        "--data_path",
        data,
        "--model_max_length",
        "128",
    ]);
    assert!(
        (l_merged - l_adapter).abs() < 1e-4,
        "merged {l_merged} vs adapter {l_adapter}"
    );

    // Generate runs with a KV cache, greedy and sampled.
    ok(
        "generate",
        &[
            "--model_name_or_path",
            s(&base),
            "--adapter",
            s(&a),
            "--bits",
            "4",
            "--prompt",
            "Repeat the words: red cat",
            "--template",
            "reference",
            "--max_new_tokens",
            "8",
        ],
    );
    ok(
        "generate",
        &[
            "--model_name_or_path",
            s(&merged),
            "--prompt",
            "Hello",
            "--temperature",
            "0.8",
            "--top_p",
            "0.9",
            "--max_new_tokens",
            "8",
        ],
    );

    // The reference README's QLoRA command, program name replaced, with --max_steps.
    let parquet = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/data/tiny_instruct.parquet"
    );
    let r = tmp.path().join("reference");
    let out = ok(
        "qlora-train",
        &[
            "--model_name_or_path",
            s(&base),
            "--data_path",
            parquet,
            "--output_dir",
            s(&r),
            "--num_train_epochs",
            "3",
            "--model_max_length",
            "1024",
            "--per_device_train_batch_size",
            "16",
            "--per_device_eval_batch_size",
            "1",
            "--gradient_accumulation_steps",
            "4",
            "--evaluation_strategy",
            "no",
            "--save_strategy",
            "steps",
            "--save_steps",
            "100",
            "--save_total_limit",
            "100",
            "--learning_rate",
            "2e-5",
            "--warmup_steps",
            "10",
            "--logging_steps",
            "1",
            "--lr_scheduler_type",
            "cosine",
            "--gradient_checkpointing",
            "True",
            "--report_to",
            "tensorboard",
            "--deepspeed",
            "configs/ds_config_zero2_no_offload.json",
            "--bf16",
            "True",
            "--use_lora",
            "True",
            "--bits",
            "4",
            "--max_grad_norm",
            "0.3",
            "--double_quant",
            "--lora_r",
            "64",
            "--lora_alpha",
            "16",
            "--quant_type",
            "nf4",
            "--max_steps",
            "1",
        ],
    );
    assert!(
        out.contains("--deepspeed") && out.contains("(stage 0)"),
        "{out}"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["r"], 64);
    assert_eq!(cfg["lora_alpha"], 16.0);
}

#[test]
fn bad_command_lines_give_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let o = s(&out);
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tiny_deepseek_moe");
    fails(
        "qlora-train",
        &[
            "--model_name_or_path",
            model,
            "--data_path",
            "/nonexistent/data.parquet",
            "--output_dir",
            o,
        ],
        "/nonexistent/data.parquet",
    );
    // A run that fails before training leaves no output directory behind.
    assert!(!out.exists(), "a failed run left {} behind", out.display());
    let late = tmp.path().join("late");
    fails(
        "qlora-train",
        &[
            "--model_name_or_path",
            model,
            "--data_path",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/fixtures/data/tiny_instruct.jsonl"
            ),
            "--output_dir",
            s(&late),
            "--max_steps",
            "1",
        ],
        "512 embeddings",
    );
    assert!(
        !late.exists(),
        "a failed run left {} behind",
        late.display()
    );
    fails(
        "qlora-train",
        &[
            "--model_name_or_path",
            "/nonexistent/model",
            "--data_path",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/fixtures/data/tiny_instruct.jsonl"
            ),
            "--output_dir",
            o,
        ],
        "not a local directory",
    );
    fails(
        "qlora-train",
        &["--output_dir", o, "--bits", "5", "--max_steps", "1"],
        "--bits 5",
    );
    fails(
        "qlora-train",
        &["--output_dir", o, "--quant_type", "nf8", "--max_steps", "1"],
        "--quant_type",
    );
    fails(
        "qlora-train",
        &["--output_dir", o, "--lr_scheduler_type", "triangle"],
        "--lr_scheduler_type",
    );
    fails(
        "qlora-train",
        &["--output_dir", o, "--learning_rate", "fast"],
        "--learning_rate",
    );
    fails(
        "qlora-train",
        &["--output_dir", o, "--bf16", "maybe"],
        "--bf16",
    );
    // Flag values are checked before the model loads: the model path does not even exist.
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/data/tiny_instruct.jsonl"
    );
    for (flag, value, needle) in [
        ("--lora_r", "0", "--lora_r 0"),
        ("--lora_dropout", "1.5", "--lora_dropout 1.5"),
        ("--warmup_ratio", "2", "--warmup_ratio 2"),
        ("--learning_rate", "nan", "--learning_rate NaN"),
        ("--trainable", "q_proj,qq_proj", "--trainable qq_proj"),
        ("--lora_alpha", "0", "--lora_alpha 0"),
        ("--num_train_epochs", "0", "--num_train_epochs 0"),
        ("--adam_beta2", "1", "--adam_beta2 1"),
        ("--adam_epsilon", "0", "--adam_epsilon 0"),
        ("--weight_decay", "nan", "--weight_decay NaN"),
        ("--optim", "adamw_9bit", "--optim adamw_9bit"),
        (
            "--adapter_dtype",
            "bfloat16",
            "--adapter_dtype bfloat16 needs --optim",
        ),
        ("--adapter_dtype", "f16", "--adapter_dtype f16"),
    ] {
        fails(
            "qlora-train",
            &[
                "--model_name_or_path",
                "/nonexistent/model",
                "--data_path",
                data,
                "--output_dir",
                o,
                "--use_lora",
                "True",
                flag,
                value,
            ],
            needle,
        );
    }
    fails(
        "qlora-train",
        &[
            "--model_name_or_path",
            "/nonexistent/model",
            "--data_path",
            data,
            "--output_dir",
            o,
            "--optim",
            "adamw_8bit",
            "--moments_dtype",
            "bfloat16",
        ],
        "--moments_dtype: adamw_8bit keeps 8-bit moments",
    );
    // A negative value parses with a space too (and, as in transformers, turns clipping off).
    fails(
        "qlora-train",
        &[
            "--model_name_or_path",
            "/nonexistent/model",
            "--data_path",
            data,
            "--output_dir",
            o,
            "--max_grad_norm",
            "-1",
        ],
        "not a local directory",
    );
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    fails(
        "qlora-train",
        &["--output_dir", s(&file.join("sub")), "--max_steps", "1"],
        "--output_dir",
    );
    fails(
        "evaluate",
        &[
            "--model_name_or_path",
            model,
            "--data_path",
            "/nonexistent.jsonl",
        ],
        "/nonexistent.jsonl",
    );
    // Each cause is said once (a JSON error used to read "…: EOF while parsing …: EOF while
    // parsing …").
    let bad = tmp.path().join("bad-adapter");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("adapter_config.json"), "").unwrap();
    let r = run(
        "merge-adapter",
        &[
            "--model_name_or_path",
            model,
            "--adapter",
            s(&bad),
            "--output_dir",
            s(&tmp.path().join("merged")),
            "--cpu",
        ],
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert_eq!(err.matches("EOF while parsing").count(), 1, "{err}");
    assert!(err.contains("adapter_config.json"), "{err}");
    // A tokenizer larger than the model's vocabulary is refused before anything is tokenized
    // (the tiny fixture model has 512 embeddings; DeepSeek's tokenizer 100,002 tokens).
    for prog in ["evaluate", "generate"] {
        let extra: &[&str] = if prog == "evaluate" {
            &["--data_path", data]
        } else {
            &["--prompt", "hi"]
        };
        let mut a = vec!["--model_name_or_path", model];
        a.extend_from_slice(extra);
        fails(
            prog,
            &a,
            "has 100002 tokens but the model only 512 embeddings",
        );
        a.extend_from_slice(&["--tokenizer", "/nonexistent"]);
        fails(
            prog,
            &a,
            "--tokenizer /nonexistent: no tokenizer.json there",
        );
    }
    fails(
        "merge-adapter",
        &[
            "--model_name_or_path",
            model,
            "--adapter",
            o,
            "--output_dir",
            o,
        ],
        "adapter_config.json",
    );
}

/// Runs `qlora-bench --preset tiny --cpu` with `args`, its JSON report going to `json`:
/// returns what it printed and the report.
fn bench_json(json: &Path, args: &[&str]) -> (String, serde_json::Value) {
    let mut a = vec!["--preset", "tiny", "--cpu", "--json", s(json)];
    a.extend_from_slice(args);
    let out = ok("qlora-bench", &a);
    let v = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (out, v)
}

#[test]
fn bench_runs_on_the_cpu_with_the_small_config() {
    let tmp = tempfile::tempdir().unwrap();
    let small = ["--batch_size", "2", "--seq_len", "32"];
    let (out, v) = bench_json(
        &tmp.path().join("bench.json"),
        &[&small[..], &["--steps", "2"]].concat(),
    );
    assert!(out.contains("RESULT"), "{out}");
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["steps"].as_array().unwrap().len(), 2);
    // The same on packed rows of a data file (what qlora-train --packing trains on).
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/data/tiny_instruct.jsonl"
    );
    let (out, v) = bench_json(
        &tmp.path().join("bench-data.json"),
        &[
            "--batch_size",
            "2",
            "--seq_len",
            "64",
            "--steps",
            "2",
            "--data",
            data,
        ],
    );
    assert!(out.contains("packed into rows of 64"), "{out}");
    let tps = v["tokens_per_s"].as_f64().unwrap();
    assert!(tps > 0.0, "{tps}");
    // Padded batches of real lengths: only real tokens are counted.
    let (out, v) = bench_json(
        &tmp.path().join("bench-padded.json"),
        &[
            "--batch_size",
            "4",
            "--seq_len",
            "128",
            "--steps",
            "2",
            "--data",
            data,
            "--packing",
            "false",
        ],
    );
    assert!(out.contains("padded to the longest"), "{out}");
    for step in v["steps"].as_array().unwrap() {
        let (real, all) = (
            step["tokens"].as_u64().unwrap(),
            step["padded_tokens"].as_u64().unwrap(),
        );
        assert!(real > 0 && real < all, "real {real} of {all} positions");
    }
    // Zipf-distributed ids (hot tokens, hence hot experts).
    let (out, _) = bench_json(
        &tmp.path().join("bench-zipf.json"),
        &[&small[..], &["--steps", "1", "--zipf", "1.1"]].concat(),
    );
    assert!(out.contains("Zipf law with exponent 1.1"), "{out}");
    fails(
        "qlora-bench",
        &["--preset", "tiny", "--cpu", "--zipf", "1.1", "--data", data],
        "it does not apply to --data",
    );
    // Full fine-tuning (bf16 weights, 8-bit AdamW): every weight trained.
    let (out, v) = bench_json(
        &tmp.path().join("bench-full.json"),
        &[
            &small[..],
            &[
                "--steps",
                "1",
                "--bits",
                "16",
                "--full",
                "--bf16_adapters",
                "--optim",
                "adamw_8bit",
            ],
        ]
        .concat(),
    );
    assert_eq!(v["full"], true, "{out}");
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    fails(
        "qlora-bench",
        &["--preset", "tiny", "--cpu", "--full"],
        "--bits 16",
    );
}

/// Starts the demo run into `out`, sends `signal` (`INT`, `TERM`) after its first logged step
/// and returns its exit status and everything it printed.
fn signal_after_first_step(out: &Path, signal: &str) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(example("qlora-train"))
        .args([
            "--output_dir",
            s(out),
            "--max_steps",
            "100000",
            "--save_steps",
            "0",
            "--logging_steps",
            "1",
            "--report_to",
            "none",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("step ") {
            break;
        }
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args([format!("-{signal}").as_str(), &pid])
        .status()
        .unwrap()
        .success());
    for line in lines {
        seen.push_str(&line.unwrap());
        seen.push('\n');
    }
    (child.wait().unwrap(), seen)
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly_and_an_adapter_can_be_continued() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (status, seen) = signal_after_first_step(&out, "INT");
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.contains("interrupted at step"), "{seen}");
    let ck = moe_peft::lora::latest_checkpoint(&out).expect("a checkpoint");
    assert!(ck.join("adapter_model.safetensors").exists());

    // Continue someone's adapter: the checkpoint is a PEFT adapter directory.
    let base = out.join("base");
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/data/tiny_instruct.jsonl"
    );
    let next = tmp.path().join("next");
    let o = ok(
        "qlora-train",
        &[
            "--model_name_or_path",
            s(&base),
            "--data_path",
            data,
            "--output_dir",
            s(&next),
            "--use_lora",
            "True",
            "--bits",
            "4",
            "--init_adapter",
            s(&ck),
            "--max_steps",
            "2",
            "--model_max_length",
            "128",
        ],
    );
    assert!(o.contains("starting from the adapter"), "{o}");
    assert!(next.join("adapter_model.safetensors").exists());
}

/// The losses of `metrics.jsonl` in `dir`, in step order.
fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn random_checkpoint_then_train_save_quantized_reload_and_pack() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    // A random tiny checkpoint in HF layout, several bf16 shards, with DeepSeek's tokenizer.
    let out = ok(
        "random-checkpoint",
        &[
            "--preset",
            "tiny",
            "--output_dir",
            s(&ck),
            "--max_shard_size",
            "10MB",
            "--seed",
            "5",
        ],
    );
    assert!(out.contains("shard"), "{out}");
    for f in [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(ck.join(f).exists(), "{f} missing");
    }
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/data/tiny_instruct.parquet"
    );
    let q = tmp.path().join("q");
    let train = |model: &Path, out: &Path, extra: &[&str]| -> String {
        let mut a = vec![
            "--model_name_or_path",
            s(model),
            "--data_path",
            data,
            "--output_dir",
            s(out),
            "--use_lora",
            "True",
            "--bits",
            "4",
            "--lora_r",
            "8",
            "--learning_rate",
            "3e-3",
            "--max_steps",
            "3",
            "--save_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--model_max_length",
            "128",
            "--logging_steps",
            "1",
            "--report_to",
            "none",
        ];
        a.extend(extra);
        ok("qlora-train", &a)
    };
    let a = tmp.path().join("a");
    let out = train(&ck, &a, &["--save_quantized", s(&q)]);
    assert!(out.contains("saved the quantized base"), "{out}");
    assert!(out.contains("first step done"), "{out}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["quant_method"], "bitsandbytes");
    assert!(q.join("tokenizer.json").exists());
    // Training from the quantized directory skips quantization and gives the same run.
    let b = tmp.path().join("b");
    train(&q, &b, &[]);
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 3);
    assert_eq!(la, lb, "quantized reload changes the losses");
    // The adapter evaluates the same on both bases.
    let eval = |model: &Path| {
        eval_loss(&[
            "--model_name_or_path",
            s(model),
            "--adapter",
            s(&a),
            "--data_path",
            data,
            "--model_max_length",
            "128",
            "--bits",
            "4",
        ])
    };
    assert_eq!(eval(&ck), eval(&q));
    // bitsandbytes' 8-bit AdamW with its state in host memory and bf16 adapter weights: the
    // checkpoint holds 8-bit optimizer state (bitsandbytes' names and maps), the adapter is
    // written in f32 as PEFT's default, and it evaluates.
    let e8 = tmp.path().join("e8");
    let out = train(
        &ck,
        &e8,
        &["--optim", "paged_adamw_8bit", "--adapter_dtype", "bfloat16"],
    );
    assert!(out.contains("first step done"), "{out}");
    let l8 = losses(&e8);
    assert!(l8.len() == 3 && l8.iter().all(|l| l.is_finite()), "{l8:?}");
    let opt = candle_core::safetensors::load(
        e8.join("checkpoint-2").join("optimizer.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(opt.contains_key("__qmap1__") && opt.contains_key("__qmap2__"));
    let adapter = candle_core::safetensors::load(
        e8.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(adapter
        .values()
        .all(|t| t.dtype() == candle_core::DType::F32));
    let l = eval_loss(&[
        "--model_name_or_path",
        s(&ck),
        "--adapter",
        s(&e8),
        "--data_path",
        data,
        "--model_max_length",
        "128",
        "--bits",
        "4",
    ]);
    assert!(l.is_finite());
    // Packing: rows of 128 tokens hold several examples; far less padding, same data.
    let p = tmp.path().join("p");
    let out = train(&ck, &p, &["--packing", "True"]);
    let pad = |o: &str| -> f64 {
        let l = o.lines().find(|l| l.starts_with("run:")).expect("run line");
        let v = l.split("padding ").nth(1).unwrap();
        v[..v.find('%').unwrap()].parse().unwrap()
    };
    let unpacked = pad(&train(&ck, &tmp.path().join("u"), &[]));
    let packed = pad(&out);
    assert!(
        packed < unpacked / 2.0 && packed < 20.0,
        "padding packed {packed}% vs unpacked {unpacked}%"
    );
    // Merge at bounded memory from the quantized base: the program reports what it did.
    let m = tmp.path().join("merged");
    let out = ok(
        "merge-adapter",
        &[
            "--model_name_or_path",
            s(&q),
            "--adapter",
            s(&a),
            "--output_dir",
            s(&m),
            "--dtype",
            "bf16",
        ],
    );
    assert!(out.contains("peak host RSS"), "{out}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none());
    assert!(m.join("tokenizer.json").exists());
}

/// Every file of `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn an_output_directory_that_is_an_input_is_refused_and_the_input_kept() {
    // A model directory with its tokenizer; qlora-train and merge-adapter told to write into
    // it under other spellings must refuse before writing anything. (merge-adapter used to
    // replace the weights and leave the tokenizer files at 0 bytes.)
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fx.join("tiny_deepseek_moe").join(f), m.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fx.join("tokenizer").join(f), m.join(f)).unwrap();
    }
    let before = snapshot(&m);
    let data = fx.join("data/tiny_instruct.jsonl");
    let same = tmp.path().join("m/../m");
    fails(
        "qlora-train",
        &[
            "--model_name_or_path",
            s(&m),
            "--data_path",
            s(&data),
            "--output_dir",
            s(&same),
            "--max_steps",
            "1",
        ],
        "is the --model_name_or_path directory",
    );
    fails(
        "merge-adapter",
        &[
            "--model_name_or_path",
            s(&m),
            "--adapter",
            s(&fx.join("lora/adapter")),
            "--output_dir",
            s(&m.join(".")),
            "--cpu",
        ],
        "is the base model directory",
    );
    assert!(snapshot(&m) == before, "the model directory changed");
}

#[test]
fn sigterm_saves_a_checkpoint_like_ctrl_c() {
    // What a job scheduler sends before it kills a job: the run saves and exits cleanly.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (status, seen) = signal_after_first_step(&out, "TERM");
    assert_eq!(
        status.code(),
        Some(130),
        "killed instead of saving: {status:?}\n{seen}"
    );
    assert!(seen.contains("interrupted at step"), "{seen}");
    let ck = moe_peft::lora::latest_checkpoint(&out).expect("a checkpoint");
    assert!(ck.join("adapter_model.safetensors").exists());
}

#[test]
fn a_run_never_mixes_with_another_runs_checkpoints() {
    // A finished demo run (checkpoints at steps 1–3, `completed`); then:
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = s(&out);
    let base = [
        "--output_dir",
        o,
        "--max_steps",
        "3",
        "--save_steps",
        "1",
        "--save_total_limit",
        "10",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
    ];
    ok("qlora-train", &base);
    assert!(out.join("completed").exists());
    // other flags in the same directory are refused, naming what differs (this used to start
    // at step 1 beside the old checkpoints);
    let mut other = base.to_vec();
    other.extend_from_slice(&["--lora_r", "4"]);
    fails("qlora-train", &other, "lora_r: 16 → 4");
    // resuming a checkpoint under other settings is refused too, unless asked for;
    let ck1 = out.join("checkpoint-1");
    let mut res = base.to_vec();
    res.extend_from_slice(&[
        "--resume_from_checkpoint",
        s(&ck1),
        "--learning_rate",
        "0.01",
    ]);
    fails("qlora-train", &res, "learning_rate: 0.005 → 0.01");
    // settings recorded only when not at their default are compared both ways;
    let mut bf = base.to_vec();
    bf.extend_from_slice(&[
        "--resume_from_checkpoint",
        s(&ck1),
        "--optim",
        "adamw_8bit",
        "--adapter_dtype",
        "bfloat16",
    ]);
    fails("qlora-train", &bf, "adapter_dtype: (unset) → \"bfloat16\"");
    // a resume under the same settings redoes steps 2 and 3 without repeating their metrics.
    let mut same = base.to_vec();
    same.extend_from_slice(&["--resume_from_checkpoint", s(&ck1)]);
    let log = ok("qlora-train", &same);
    assert!(log.contains("resuming from"), "{log}");
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3], "metrics.jsonl rows by step");
    // --overwrite_output_dir starts over with the new flags.
    let mut over = other.clone();
    over.extend_from_slice(&["--overwrite_output_dir", "True"]);
    ok("qlora-train", &over);
    assert!(out.join("completed").exists());
}

/// The demo at its defaults ends with greedy answers of base/ and base/ + adapter: the tuned
/// answers are not empty, differ from the base's, and use only each task's words or digits.
#[test]
fn demo_ends_with_generations_that_show_what_was_learned() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ok("qlora-train", &["--output_dir", s(tmp.path())]);
    let start = out
        .find("demo generation")
        .unwrap_or_else(|| panic!("no demo generation in:\n{out}"));
    let words = [
        "red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star",
        "rock", "milk", "book", "lamp", "ship",
    ];
    let lines: Vec<&str> = out[start..]
        .lines()
        .skip(1)
        .filter(|l| l.contains(" → "))
        .collect();
    assert_eq!(lines.len(), 4, "{out}");
    for line in lines {
        let (left, after) = line.rsplit_once(" → ").unwrap();
        let parse =
            |q: &str| -> String { serde_json::from_str(q.trim()).expect("a quoted answer") };
        let after = parse(after);
        let before = parse(&left[left.find('"').expect("quoted base answer")..]);
        assert!(!after.is_empty(), "empty answer: {line}");
        assert_ne!(after, before, "{line}");
        let tokens: Vec<&str> = after.split_whitespace().collect();
        let ok = if line.contains("word") {
            tokens.iter().all(|t| words.contains(t))
        } else {
            tokens.iter().all(|t| t.chars().all(|c| c.is_ascii_digit()))
        };
        assert!(ok, "not in the task's format: {line}");
    }
}

/// Each other family end to end: a random checkpoint written from a family config (DeepSeek's
/// vocabulary, so the built-in tokenizer fits), QLoRA training without `--trainable` targets
/// the family's projections, the adapter names them as PEFT does, and `evaluate` loads it.
#[test]
fn other_families_train_from_their_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/data/tiny_instruct.parquet"
    );
    for (family, expert_key) in [
        ("mixtral", "1.block_sparse_moe.experts.3.w2.lora_A.weight"),
        ("qwen2_moe", "1.mlp.shared_expert.up_proj.lora_B.weight"),
        ("qwen3_moe", "2.mlp.experts.5.gate_proj.lora_A.weight"),
        ("olmoe", "0.mlp.experts.0.down_proj.lora_B.weight"),
    ] {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/families")
            .join(family)
            .join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
        cfg["vocab_size"] = serde_json::json!(102400);
        cfg["max_position_embeddings"] = serde_json::json!(256);
        let cfg_path = tmp.path().join(format!("{family}.json"));
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let ck = tmp.path().join(format!("{family}-base"));
        ok(
            "random-checkpoint",
            &[
                "--config",
                s(&cfg_path),
                "--output_dir",
                s(&ck),
                "--dtype",
                "f32",
            ],
        );
        let out = tmp.path().join(format!("{family}-out"));
        // The fixture configs turn output_router_logits on; one run sets the weight, one turns
        // the loss off.
        let aux: &[&str] = match family {
            "mixtral" => &["--router_aux_loss_coef", "0.02"],
            "olmoe" => &["--output_router_logits", "false"],
            _ => &[],
        };
        let mut argv = vec![
            "--model_name_or_path",
            s(&ck),
            "--data_path",
            data,
            "--output_dir",
            s(&out),
            "--use_lora",
            "True",
            "--bits",
            "4",
            "--lora_r",
            "4",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--model_max_length",
            "64",
            "--modules_to_save",
            "none",
            "--report_to",
            "none",
        ];
        argv.extend(aux);
        let log = ok("qlora-train", &argv);
        assert!(log.contains("step"), "{family}: {log}");
        let want = match family {
            "mixtral" => "router balancing loss, coef 0.02",
            "olmoe" => "no balancing loss",
            _ => "router balancing loss, coef 0.05",
        };
        assert!(log.contains(want), "{family}: {log}");
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let targets: Vec<String> = serde_json::from_value(cfg["target_modules"].clone()).unwrap();
        let want: &[&str] = if family == "mixtral" {
            &["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
        } else {
            &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
        };
        for t in want {
            assert!(targets.iter().any(|x| x == t), "{family}: {targets:?}");
        }
        let st = candle_core::safetensors::load(
            out.join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let key = format!("base_model.model.model.layers.{expert_key}");
        assert!(st.contains_key(&key), "{family}: no {key}");
        let eval = ok(
            "evaluate",
            &[
                "--model_name_or_path",
                s(&ck),
                "--adapter",
                s(&out),
                "--data_path",
                data,
                "--model_max_length",
                "64",
            ],
        );
        assert!(eval.contains("loss"), "{family}: {eval}");
    }
}

/// Full fine-tuning with bf16 weights and 8-bit AdamW: checkpoints hold the projections in bf16
/// and the norms in f32, the run resumes from one, and the final model is a HF checkpoint.
#[test]
fn full_finetuning_with_bf16_weights_checkpoints_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    ok(
        "random-checkpoint",
        &["--preset", "tiny", "--output_dir", s(&ck), "--dtype", "f32"],
    );
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/data/tiny_instruct.parquet"
    );
    let out = tmp.path().join("out");
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--model_name_or_path",
            s(&ck),
            "--data_path",
            data,
            "--output_dir",
            s(&out),
            "--use_lora",
            "False",
            "--bits",
            "16",
            "--optim",
            "adamw_8bit",
            "--adapter_dtype",
            "bfloat16",
            "--learning_rate",
            "1e-4",
            "--per_device_train_batch_size",
            "2",
            "--model_max_length",
            "64",
            "--save_steps",
            "2",
            "--report_to",
            "none",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let a = args(&["--max_steps", "2"]);
    let log = ok(
        "qlora-train",
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(log.contains("stochastic rounding"), "{log}");
    let ckpt = out.join("checkpoint-2");
    let st =
        candle_core::safetensors::load(ckpt.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(
        st["model.layers.1.mlp.experts.3.up_proj.weight"].dtype(),
        candle_core::DType::BF16
    );
    assert_eq!(
        st["model.layers.1.input_layernorm.weight"].dtype(),
        candle_core::DType::F32
    );
    assert_eq!(
        st["model.layers.1.mlp.gate.weight"].dtype(),
        candle_core::DType::F32
    );
    // Two more steps from the checkpoint; the final model is written.
    let a = args(&["--max_steps", "4", "--resume_from_checkpoint", "True"]);
    let log = ok(
        "qlora-train",
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        log.contains(&format!("resuming from {}", ckpt.display())),
        "{log}"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoint-4").join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["global_step"], 4, "{state}");
    assert!(out.join("checkpoint-4").join("model.safetensors").exists());
    assert!(out.join("config.json").exists() && out.join("model.safetensors").exists());
    // The final model is the last checkpoint's file, linked rather than written again.
    {
        use std::os::unix::fs::MetadataExt;
        let ino = |p: PathBuf| std::fs::metadata(p).unwrap().ino();
        assert_eq!(
            ino(out.join("model.safetensors")),
            ino(out.join("checkpoint-4").join("model.safetensors"))
        );
        assert!(log.contains("linked to the files of"), "{log}");
    }
    // A checkpoint that cannot be written (here: a file where its temporary directory goes)
    // is reported, and training goes on to the next save and the final model.
    let out2 = tmp.path().join("out2");
    std::fs::create_dir_all(&out2).unwrap();
    std::fs::write(out2.join(".checkpoint-2.tmp"), b"in the way").unwrap();
    let mut a = args(&["--max_steps", "4"]);
    let at = a.iter().position(|x| x == s(&out)).unwrap();
    a[at] = s(&out2).to_string();
    let log = ok(
        "qlora-train",
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        log.contains("warning: the checkpoint of step 2 failed")
            && log.contains(".checkpoint-2.tmp"),
        "{log}"
    );
    assert!(!out2.join("checkpoint-2").exists());
    assert!(out2
        .join("checkpoint-4")
        .join("trainer_state.json")
        .exists());
    assert!(out2.join("model.safetensors").exists());
}

/// Started as rank 0 of a group of one (torchrun's variables), a run writes the same adapter
/// as a plain run; several ranks need the NCCL build, and say so; a malformed variable is named.
#[test]
fn a_group_of_one_is_a_plain_run_and_bigger_groups_need_nccl() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    ok(
        "random-checkpoint",
        &["--preset", "tiny", "--output_dir", s(&ck), "--dtype", "f32"],
    );
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/data/tiny_instruct.parquet"
    );
    let args = |out: &Path| -> Vec<String> {
        [
            "--model_name_or_path",
            s(&ck),
            "--data_path",
            data,
            "--output_dir",
            s(out),
            "--use_lora",
            "True",
            "--lora_r",
            "4",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--model_max_length",
            "64",
            "--report_to",
            "none",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let aa = args(&a);
    ok(
        "qlora-train",
        &aa.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let o = Command::new(example("qlora-train"))
        .args(args(&b))
        .env("RANK", "0")
        .env("WORLD_SIZE", "1")
        .output()
        .expect("spawn");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(a.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(b.join("adapter_model.safetensors")).unwrap()
    );
    let o = Command::new(example("qlora-train"))
        .args(args(&tmp.path().join("c")))
        .env("RANK", "one")
        .env("WORLD_SIZE", "2")
        .output()
        .expect("spawn");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("RANK"), "{err}");
    if !cfg!(feature = "nccl") {
        let mut c = args(&tmp.path().join("d"));
        c.extend(["--nproc_per_node".to_string(), "2".to_string()]);
        fails(
            "qlora-train",
            &c.iter().map(String::as_str).collect::<Vec<_>>(),
            "--features nccl",
        );
    }
}
