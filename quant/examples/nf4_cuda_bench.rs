//! NF4 quantize / dequantize throughput of the CUDA kernels on DeepSeekMoE-16B-sized bf16
//! weights (routed expert 1408x2048, dense layer-0 MLP 10944x2048).
//!
//! `cargo run --release --features cuda -p moe-peft-quant --example nf4_cuda_bench [-- --iters N]`
//!
//! "sync µs" is the median of N timed runs (default 20) after 3 warm-ups, with the device
//! synchronized before and after each run (so it includes the launch latency and a fresh output
//! allocation); "stream µs" is the mean of N back-to-back runs between two synchronizations (the
//! steady state inside a training step). "in GB/s" counts the bf16 weight (quantize reads it,
//! dequantize writes the output); "traffic" counts every byte read and written (weight or output,
//! packed codes, absmax or its 8-bit codes), in GB/s. Quantization with double quantization
//! includes the 4-byte copy of the offset back to the host (a synchronization).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use moe_peft_quant::{FourBitConfig, FourBitTensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (median seconds of one synchronized call, mean seconds per call of `iters` back-to-back calls
/// between two synchronizations).
fn time(
    dev: &Device,
    iters: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64)> {
    for _ in 0..3 {
        f()?;
    }
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters {
        dev.synchronize()?;
        let start = Instant::now();
        f()?;
        dev.synchronize()?;
        t.push(start.elapsed().as_secs_f64());
    }
    dev.synchronize()?;
    let start = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok((median(t), start.elapsed().as_secs_f64() / iters as f64))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let iters = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(20usize)
        .max(1);
    let dev = Device::new_cuda(0)?;
    println!("iters: {iters} (median), device: CUDA 0");
    println!(
        "{:<26} {:<22} {:>8} {:>9} {:>9} {:>10} {:>10}",
        "matrix (out x in)", "op", "sync µs", "in GB/s", "traffic", "stream µs", "traffic"
    );
    for (name, rows, cols) in [
        ("expert gate/up 1408x2048", 1408usize, 2048usize),
        ("dense MLP 10944x2048", 10944, 2048),
    ] {
        let w = Tensor::randn(0f32, 0.02, (rows, cols), &dev)?.to_dtype(DType::BF16)?;
        let n = (rows * cols) as f64;
        let weight = 2.0 * n;
        // baseline: candle's own device copy of the bf16 weight (allocation + copy kernel)
        let (s, p) = time(&dev, iters, || {
            w.copy()?;
            Ok(())
        })?;
        println!(
            "{name:<26} {:<22} {:>8.1} {:>9.1} {:>9.1} {:>10.1} {:>10.1}",
            "candle copy (baseline)",
            s * 1e6,
            weight / s / 1e9,
            2.0 * weight / s / 1e9,
            p * 1e6,
            2.0 * weight / p / 1e9
        );
        for (label, cfg) in [
            ("quantize nf4+dq", FourBitConfig::default()),
            ("quantize nf4", FourBitConfig::nf4_no_double_quant()),
        ] {
            let absmax_bytes = if cfg.double_quant {
                n / 64.0 * (4.0 + 1.0) // fp32 absmax written and re-read, 8-bit codes written
            } else {
                n / 64.0 * 4.0
            };
            let (s, p) = time(&dev, iters, || {
                FourBitTensor::quantize(&w, &cfg)?;
                Ok(())
            })?;
            let traffic = weight + n / 2.0 + absmax_bytes;
            println!(
                "{name:<26} {label:<22} {:>8.1} {:>9.1} {:>9.1} {:>10.1} {:>10.1}",
                s * 1e6,
                weight / s / 1e9,
                traffic / s / 1e9,
                p * 1e6,
                traffic / p / 1e9
            );
        }
        for (label, cfg) in [
            ("dequant nf4+dq", FourBitConfig::default()),
            ("dequant nf4", FourBitConfig::nf4_no_double_quant()),
        ] {
            let q = FourBitTensor::quantize(&w, &cfg)?;
            for dt in [DType::BF16, DType::F32] {
                let out = n * dt.size_in_bytes() as f64;
                let absmax_bytes = if cfg.double_quant {
                    n / 64.0
                } else {
                    n / 64.0 * 4.0
                };
                let (s, p) = time(&dev, iters, || {
                    q.dequantize(dt)?;
                    Ok(())
                })?;
                let traffic = out + n / 2.0 + absmax_bytes;
                println!(
                    "{name:<26} {:<22} {:>8.1} {:>9.1} {:>9.1} {:>10.1} {:>10.1}",
                    format!("{label} -> {dt:?}"),
                    s * 1e6,
                    out / s / 1e9,
                    traffic / s / 1e9,
                    p * 1e6,
                    traffic / p / 1e9
                );
            }
        }
    }
    Ok(())
}
