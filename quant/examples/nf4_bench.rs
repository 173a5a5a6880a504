//! NF4 quantize / dequantize throughput on DeepSeekMoE-16B-sized projection weights.
//!
//! `cargo run --release -p moe-peft-quant --example nf4_bench [-- --iters N]`
//!
//! Reports GB/s of bf16 input for quantization (NF4, blocks of 64, double quantization) and of
//! bf16 output for dequantization, as the median of N runs (default 5) after one warm-up.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use moe_peft_quant::{FourBitConfig, FourBitTensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let iters = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5usize);
    let dev = Device::Cpu;
    let cfg = FourBitConfig::default();
    println!(
        "rayon threads: {}, iters: {iters}, config: {}",
        rayon::current_num_threads(),
        serde_json::to_string(&cfg)?
    );
    println!(
        "{:<34} {:>9} {:>12} {:>14} {:>14} {:>14}",
        "matrix (out x in)", "Mparams", "bits/param", "quant GB/s", "deq bf16 GB/s", "deq f32 GB/s"
    );
    for (name, rows, cols) in [
        ("routed expert gate/up 1408x2048", 1408usize, 2048usize),
        ("routed expert down 2048x1408", 2048, 1408),
        ("attention q/k/v/o 2048x2048", 2048, 2048),
        ("dense MLP (layer 0) 10944x2048", 10944, 2048),
        ("dense MLP down 2048x10944", 2048, 10944),
    ] {
        let w = Tensor::randn(0f32, 0.02, (rows, cols), &dev)?.to_dtype(DType::BF16)?;
        let n = rows * cols;
        let bf16_bytes = (2 * n) as f64;
        let mut q = FourBitTensor::quantize(&w, &cfg)?; // warm-up
        let mut tq = Vec::new();
        for _ in 0..iters {
            let t = Instant::now();
            q = FourBitTensor::quantize(&w, &cfg)?;
            tq.push(t.elapsed().as_secs_f64());
        }
        let _ = q.dequantize(DType::BF16)?; // warm-up
        let mut td = Vec::new();
        for _ in 0..iters {
            let t = Instant::now();
            let d = q.dequantize(DType::BF16)?;
            td.push(t.elapsed().as_secs_f64());
            drop(d);
        }
        let mut tf = Vec::new();
        for _ in 0..iters {
            let t = Instant::now();
            let d = q.dequantize(DType::F32)?;
            tf.push(t.elapsed().as_secs_f64());
            drop(d);
        }
        let exact_bits = 8.0 * q.storage_bytes() as f64 / n as f64;
        println!(
            "{:<34} {:>9.2} {:>12.4} {:>14.2} {:>14.2} {:>14.2}",
            name,
            n as f64 / 1e6,
            exact_bits,
            bf16_bytes / median(tq) / 1e9,
            bf16_bytes / median(td) / 1e9,
            (4 * n) as f64 / median(tf) / 1e9,
        );
    }
    Ok(())
}
