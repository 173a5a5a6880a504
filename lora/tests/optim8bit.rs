//! The 8-bit blockwise AdamW (`adamw_8bit`) and bf16 adapter weights with stochastic rounding:
//! each update equals the published bitsandbytes algorithm element by element; training the
//! tiny model with them follows f32 AdamW; checkpoints resume bit for bit.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use common::{counting_batch as batch, tiny_base as base};
use moe_peft_kernels::FlatGrads;
use moe_peft_lora::{
    AdamW, AdamWConfig, LoraConfig, LoraModel, Optim, Schedule, TrainConfig, Trainer,
};
use moe_peft_quant::dynamic::create_dynamic_map;

/// The oracle: bitsandbytes' 8-bit blockwise Adam as its kernel states it, written plainly
/// (the code counted from the map's midpoints instead of the kernel's binary search).
struct Oracle {
    m: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
    a1: Vec<Vec<f32>>,
    a2: Vec<Vec<f32>>,
    m32: Vec<Vec<f32>>,
    v32: Vec<Vec<f32>>,
}

/// The code `quantize_2D` gives `x` in a sorted map: the nearer of the two entries around `x`,
/// decided against their midpoint rounded to f32 (not the exact distance, which differs when
/// `x` lies within rounding of the midpoint); a value on the midpoint takes the even code,
/// because the kernel's search always ends on an even index.
fn nearest(map: &[f32; 256], x: f32) -> u8 {
    let passed = (0..255)
        .filter(|&k| {
            let mid = (map[k] + map[k + 1]) * 0.5;
            x > mid || (x == mid && k % 2 == 1)
        })
        .count();
    passed as u8
}

#[allow(clippy::too_many_arguments)]
fn oracle_step(
    o: &mut Oracle,
    params: &mut [Vec<f32>],
    grads: &[Vec<f32>],
    eight: &[bool],
    (b1, b2, eps, wd, lr): (f32, f32, f32, f32, f32),
    t: i32,
) {
    let sm = create_dynamic_map(true);
    let um = create_dynamic_map(false);
    // As bitsandbytes' kernel: the bias corrections rounded to f32, the rest in f32.
    let c1 = (1.0 - (b1 as f64).powi(t)) as f32;
    let c2 = (1.0 - (b2 as f64).powi(t)).sqrt() as f32;
    let step_size = -lr * c2 / c1;
    let c2eps = c2 * eps;
    let decay = 1.0 - lr * wd;
    for (i, p) in params.iter_mut().enumerate() {
        let n = p.len();
        let upd = |p: f32, m: f32, v: f32| {
            let mut p = p + step_size * (m / (v.sqrt() + c2eps));
            if wd > 0.0 {
                p *= decay;
            }
            p
        };
        if !eight[i] {
            for j in 0..n {
                let g = grads[i][j];
                o.m32[i][j] = o.m32[i][j] * b1 + g * (1.0 - b1);
                o.v32[i][j] = o.v32[i][j] * b2 + (g * g) * (1.0 - b2);
                p[j] = upd(p[j], o.m32[i][j], o.v32[i][j]);
            }
            continue;
        }
        for (blk, start) in (0..n).step_by(256).enumerate() {
            let end = (start + 256).min(n);
            let mut s1 = vec![0f32; end - start];
            let mut s2 = vec![0f32; end - start];
            for j in start..end {
                let g = grads[i][j];
                let m = sm[o.m[i][j] as usize] * o.a1[i][blk];
                let v = um[o.v[i][j] as usize] * o.a2[i][blk];
                s1[j - start] = m * b1 + g * (1.0 - b1);
                s2[j - start] = v * b2 + (g * g) * (1.0 - b2);
            }
            let mx1 = s1.iter().fold(0f32, |a, x| a.max(x.abs()));
            let mx2 = s2.iter().fold(0f32, |a, x| a.max(x.abs()));
            for j in start..end {
                let (x1, x2) = (s1[j - start], s2[j - start]);
                p[j] = upd(p[j], x1, x2);
                let mut q = nearest(&sm, if mx1 > 0.0 { x1 / mx1 } else { 0.0 });
                if sm[q as usize].is_sign_negative() != x1.is_sign_negative() {
                    q = if x1 > 0.0 { q + 1 } else { q - 1 };
                }
                o.m[i][j] = q;
                o.v[i][j] = nearest(&um, if mx2 > 0.0 { x2 / mx2 } else { 0.0 });
            }
            o.a1[i][blk] = mx1;
            o.a2[i][blk] = mx2;
        }
    }
}

#[test]
fn each_update_is_the_published_algorithm_element_by_element() -> Result<()> {
    let dev = Device::Cpu;
    // 8-bit with a partial last block, f32 (under min_8bit_size), 8-bit of whole blocks.
    let shapes: [&[usize]; 3] = [&[50, 100], &[300], &[16, 256]];
    let eight = [true, false, true];
    let mut params: Vec<Vec<f32>> = Vec::new();
    let mut vars = Vec::new();
    for (k, s) in shapes.iter().enumerate() {
        let t = Tensor::randn(0f32, 1.0, *s, &dev)?;
        params.push(t.flatten_all()?.to_vec1()?);
        vars.push((format!("v{k}"), Var::from_tensor(&t)?));
    }
    let (b1, b2, eps, wd, lr) = (0.9f32, 0.999f32, 1e-8f32, 0.01f32, 1e-2f32);
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            beta1: b1 as f64,
            beta2: b2 as f64,
            eps: eps as f64,
            weight_decay: wd as f64,
            optim: Optim::Adamw8bit,
            min_8bit_size: 1000,
            ..Default::default()
        },
    )?;
    let mut o = Oracle {
        m: params.iter().map(|p| vec![0; p.len()]).collect(),
        v: params.iter().map(|p| vec![0; p.len()]).collect(),
        a1: params
            .iter()
            .map(|p| vec![0.0; p.len().div_ceil(256)])
            .collect(),
        a2: params
            .iter()
            .map(|p| vec![0.0; p.len().div_ceil(256)])
            .collect(),
        m32: params.iter().map(|p| vec![0.0; p.len()]).collect(),
        v32: params.iter().map(|p| vec![0.0; p.len()]).collect(),
    };
    for t in 1..=6 {
        let flat = FlatGrads::new(&vars, DType::F32)?;
        let mut gs = Vec::new();
        for (_, v) in &vars {
            // Gradients of varied scale, so blocks get different scales.
            let g = (Tensor::randn(0f32, 1.0, v.shape(), &dev)? * (t as f64 * 0.3))?;
            flat.add(v.as_tensor().id(), &g)?;
            gs.push(g.flatten_all()?.to_vec1::<f32>()?);
        }
        opt.step_flat(&flat, lr as f64, 1.0)?;
        oracle_step(&mut o, &mut params, &gs, &eight, (b1, b2, eps, wd, lr), t);
        for (k, (_, v)) in vars.iter().enumerate() {
            let got = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let same = got
                .iter()
                .zip(&params[k])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "step {t}, variable {k}: parameters differ");
        }
    }
    // The saved state holds the oracle's codes and scales under bitsandbytes' names.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("opt.safetensors");
    opt.save(&path)?;
    let st = candle_core::safetensors::load(&path, &dev)?;
    assert_eq!(st["v0.state1"].flatten_all()?.to_vec1::<u8>()?, o.m[0]);
    assert_eq!(st["v0.state2"].flatten_all()?.to_vec1::<u8>()?, o.v[0]);
    assert_eq!(st["v2.state1"].flatten_all()?.to_vec1::<u8>()?, o.m[2]);
    assert_eq!(st["v0.absmax1"].to_vec1::<f32>()?, o.a1[0]);
    assert_eq!(st["v2.absmax2"].to_vec1::<f32>()?, o.a2[2]);
    assert_eq!(st["v1.exp_avg"].to_vec1::<f32>()?, o.m32[1]);
    assert_eq!(st["v1.exp_avg_sq"].to_vec1::<f32>()?, o.v32[1]);
    assert_eq!(
        st["__qmap2__"].to_vec1::<f32>()?,
        create_dynamic_map(false).to_vec()
    );
    // And loads back into a fresh optimizer that continues identically.
    let vars2: Vec<(String, Var)> = vars
        .iter()
        .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
        .collect::<Result<_>>()?;
    let mut opt2 = AdamW::new(vars2.clone(), opt.config().clone())?;
    opt2.load(&path)?;
    let (f1, f2) = (
        FlatGrads::new(&vars, DType::F32)?,
        FlatGrads::new(&vars2, DType::F32)?,
    );
    for ((_, a), (_, b)) in vars.iter().zip(&vars2) {
        let g = Tensor::randn(0f32, 1.0, a.shape(), &dev)?;
        f1.add(a.as_tensor().id(), &g)?;
        f2.add(b.as_tensor().id(), &g)?;
    }
    opt.step_flat(&f1, 1e-2, 0.5)?;
    opt2.step_flat(&f2, 1e-2, 0.5)?;
    for ((_, a), (_, b)) in vars.iter().zip(&vars2) {
        assert_eq!(
            a.as_tensor().flatten_all()?.to_vec1::<f32>()?,
            b.as_tensor().flatten_all()?.to_vec1::<f32>()?
        );
    }
    // A dense (adamw_torch) optimizer refuses 8-bit state, naming the file.
    let mut dense = AdamW::new(vars2, AdamWConfig::default())?;
    let e = dense.load(&path).unwrap_err().to_string();
    assert!(e.contains("opt.safetensors") && e.contains("8-bit"), "{e}");
    Ok(())
}

fn lora_cfg() -> LoraConfig {
    common::deepseek_lora(8, 16.0, 0.0)
}

fn train_cfg(steps: usize, optim: Optim) -> TrainConfig {
    TrainConfig {
        learning_rate: 3e-4,
        lr_scheduler_type: Schedule::Cosine,
        warmup_steps: 10,
        max_steps: steps,
        max_grad_norm: 0.3,
        optim,
        // Every tiny adapter goes 8-bit (bitsandbytes would keep tensors under 4096 in f32).
        min_8bit_size: 0,
        ..Default::default()
    }
}

fn losses(lm: LoraModel, cfg: TrainConfig, steps: usize) -> Result<Vec<f64>> {
    let mut t = Trainer::new(lm, cfg)?;
    (0..steps).map(|s| Ok(t.step(&[batch(s)?])?.loss)).collect()
}

/// Mean of `xs[a..b]`.
fn mean(xs: &[f64], a: usize, b: usize) -> f64 {
    xs[a..b].iter().sum::<f64>() / (b - a) as f64
}

#[test]
fn eight_bit_adamw_and_bf16_adapters_train_like_f32_adamw() -> Result<()> {
    let steps = 300;
    let reference = losses(
        LoraModel::new(base()?, lora_cfg(), 5)?,
        train_cfg(steps, Optim::AdamwTorch),
        steps,
    )?;
    let eight = losses(
        LoraModel::new(base()?, lora_cfg(), 5)?,
        train_cfg(steps, Optim::Adamw8bit),
        steps,
    )?;
    let bf16 = losses(
        LoraModel::with_adapter_dtype(base()?, lora_cfg(), 5, DType::BF16)?,
        train_cfg(steps, Optim::Adamw8bit),
        steps,
    )?;
    let (start, end) = (mean(&reference, 0, 10), mean(&reference, steps - 20, steps));
    let drop = start - end;
    eprintln!("f32 AdamW: {start:.4} → {end:.4}");
    for (name, l) in [
        ("adamw_8bit", &eight),
        ("adamw_8bit + bf16 adapters", &bf16),
    ] {
        let e = mean(l, steps - 20, steps);
        // Largest gap over the run, in 20-step windows (single steps are noisy).
        let gap = (0..steps / 20)
            .map(|w| (mean(l, 20 * w, 20 * w + 20) - mean(&reference, 20 * w, 20 * w + 20)).abs())
            .fold(0f64, f64::max);
        eprintln!(
            "{name}: end {e:.4} ({:+.2} % of the drop), largest windowed gap {gap:.4}",
            100.0 * (e - end) / drop
        );
        // Bounds: the end loss within 5 % of f32 AdamW's drop, every 20-step window within 5 %
        // of the drop. Measured: both within 0.6 % (end) and 0.0015 (window); bf16 adapters
        // rounded to nearest instead of stochastically end 18.6 % of the drop behind (their
        // 3e-4-sized updates are mostly below half a bf16 ulp and vanish), so the bound tells
        // the rounding schemes apart.
        assert!(drop > 0.2, "the reference must learn: {start} → {end}");
        assert!((e - end).abs() < 0.05 * drop, "{name}: {e} vs {end}");
        assert!(
            gap < 0.05 * drop,
            "{name}: windowed gap {gap} vs drop {drop}"
        );
    }
    Ok(())
}

#[test]
fn eight_bit_state_and_bf16_adapters_resume_exactly() -> Result<()> {
    let cfg = train_cfg(8, Optim::PagedAdamw8bit);
    let lm = || {
        Ok(LoraModel::with_adapter_dtype(
            base()?,
            lora_cfg(),
            3,
            DType::BF16,
        )?)
    };
    let (full, resumed) = common::train_checkpoint_resume(&lm, cfg, 4, 8)?;
    for (n, v) in full.vars() {
        let want = if n.contains("lora_") {
            DType::BF16
        } else {
            DType::F32
        };
        assert_eq!(v.dtype(), want, "{n}");
    }
    common::assert_same_vars(full.vars(), resumed.vars())?;
    // adamw_torch refuses bf16 adapters, naming the variable.
    let e = Trainer::new(lm()?, train_cfg(2, Optim::AdamwTorch))
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora_") && e.contains("adamw_8bit"), "{e}");
    Ok(())
}

#[test]
fn a_missing_gradient_counts_as_zeros_for_eight_bit_moments() -> Result<()> {
    let dev = Device::Cpu;
    let init = [
        Tensor::randn(0f32, 1.0, (20, 300), &dev)?,
        Tensor::randn(0f32, 1.0, (700,), &dev)?,
    ];
    let mk = || -> Result<Vec<(String, Var)>> {
        init.iter()
            .enumerate()
            .map(|(i, t)| Ok((format!("v{i}"), Var::from_tensor(&t.copy()?)?)))
            .collect()
    };
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        optim: Optim::Adamw8bit,
        min_8bit_size: 1000,
        ..Default::default()
    };
    let (va, vb) = (mk()?, mk()?);
    let mut a = AdamW::new(va.clone(), cfg.clone())?;
    let mut b = AdamW::new(vb.clone(), cfg)?;
    let g = Tensor::randn(0f32, 1.0, (700,), &dev)?;
    a.step(&[None, Some(g.clone())], 1e-2)?;
    let flat = FlatGrads::new(&vb, DType::F32)?;
    flat.add(vb[1].1.as_tensor().id(), &g)?;
    b.step_flat(&flat, 1e-2, 1.0)?;
    for ((_, x), (_, y)) in va.iter().zip(&vb) {
        assert_eq!(
            x.as_tensor().flatten_all()?.to_vec1::<f32>()?,
            y.as_tensor().flatten_all()?.to_vec1::<f32>()?
        );
    }
    Ok(())
}
