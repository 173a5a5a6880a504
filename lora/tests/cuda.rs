//! CUDA vs CPU parity of the optimizer: AdamW per tensor and in one launch over the flat
//! gradient buffer, and the global gradient norm. (The kernels' own parity tests are in
//! `kernels/tests/cuda.rs`.)
//!
//! Built only with `--features cuda`; without a GPU each test says so and passes, unless
//! `MOE_PEFT_REQUIRE_CUDA=1`, which makes a missing GPU a failure. On a GPU the AdamW updates
//! (f32 and bf16 moments, per tensor and in one launch) are bit-identical on both devices, and
//! the global norm agrees within the bound stated in its test; the 8-bit AdamW (in device and
//! in mapped host memory, f32 and bf16 variables and gradients) gives the same parameters and
//! state bytes as its CPU twin.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};

type Result<T> = anyhow::Result<T>;

fn gpu() -> Option<Device> {
    moe_peft_kernels::cuda_device_or_skip()
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(moe_peft_kernels::bit_patterns(t)?)
}

#[test]
fn adamw_updates_are_bit_identical_on_cpu_and_cuda() -> Result<()> {
    use moe_peft_lora::{AdamW, AdamWConfig};
    let Some(gpu) = gpu() else { return Ok(()) };
    for bf16_moments in [false, true] {
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            bf16_moments,
            ..Default::default()
        };
        let init = Tensor::randn(0f32, 1.0, (3, 1001), &Device::Cpu)?;
        let pc = Var::from_tensor(&init)?;
        let pg = Var::from_tensor(&init.to_device(&gpu)?)?;
        let mut oc = AdamW::new(vec![("p".into(), pc.clone())], cfg.clone())?;
        let mut og = AdamW::new(vec![("p".into(), pg.clone())], cfg)?;
        for step in 0..4 {
            let g = Tensor::randn(0f32, 1.0, (3, 1001), &Device::Cpu)?;
            let clip = if step % 2 == 0 { 1.0 } else { 0.37 };
            oc.step_scaled(&[Some(g.clone())], 1e-2, clip)?;
            og.step_scaled(&[Some(g.to_device(&gpu)?)], 1e-2, clip)?;
            assert_eq!(
                bits(pc.as_tensor())?,
                bits(pg.as_tensor())?,
                "step {step}, bf16 moments {bf16_moments}"
            );
        }
    }
    Ok(())
}

#[test]
fn flat_gradients_and_one_launch_adamw_match_the_cpu() -> Result<()> {
    use moe_peft_kernels::FlatGrads;
    use moe_peft_lora::{AdamW, AdamWConfig};
    let Some(gpu) = gpu() else { return Ok(()) };
    let shapes: [&[usize]; 4] = [&[3, 1001], &[64, 7], &[1], &[5, 2, 33]];
    for (bf16_moments, grad_dtype) in [
        (false, DType::F32),
        (true, DType::F32),
        (false, DType::BF16),
        (true, DType::BF16),
    ] {
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            bf16_moments,
            ..Default::default()
        };
        let inits: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(0f32, 1.0, *s, &Device::Cpu))
            .collect::<candle_core::Result<_>>()?;
        let mk = |dev: &Device| -> Result<Vec<(String, Var)>> {
            inits
                .iter()
                .enumerate()
                .map(|(i, t)| Ok((format!("p{i}"), Var::from_tensor(&t.to_device(dev)?)?)))
                .collect()
        };
        let (vc, vg) = (mk(&Device::Cpu)?, mk(&gpu)?);
        let (fc, fg) = (
            FlatGrads::new(&vc, grad_dtype)?,
            FlatGrads::new(&vg, grad_dtype)?,
        );
        let mut oc = AdamW::new(vc.clone(), cfg.clone())?;
        let mut og = AdamW::new(vg.clone(), cfg)?;
        for step in 0..4 {
            fc.zero()?;
            fg.zero()?;
            // Two additions per variable (f32 then bf16), the last variable left without.
            for (i, s) in shapes.iter().enumerate().take(3) {
                for dt in [DType::F32, DType::BF16] {
                    let g = Tensor::randn(0f32, 1.0, *s, &Device::Cpu)?.to_dtype(dt)?;
                    fc.add(vc[i].1.as_tensor().id(), &g)?;
                    fg.add(vg[i].1.as_tensor().id(), &g.to_device(&gpu)?)?;
                }
            }
            assert_eq!(bits(fc.buffer())?, bits(fg.buffer())?, "sums, step {step}");
            let (nc, ng) = (fc.norm()?, fg.norm()?);
            assert!(((nc - ng) / nc).abs() < 1e-12, "norm {nc} vs {ng}");
            let clip = if step % 2 == 0 { 1.0 } else { 0.37 };
            oc.step_flat(&fc, 1e-2, clip)?;
            og.step_flat(&fg, 1e-2, clip)?;
            for (i, ((_, c), (_, g))) in vc.iter().zip(&vg).enumerate() {
                assert_eq!(
                    bits(c.as_tensor())?,
                    bits(g.as_tensor())?,
                    "variable {i}, step {step}, bf16 moments {bf16_moments}, grads {grad_dtype:?}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn gradient_norms_match_the_cpu() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let grads: Vec<Option<Tensor>> = (0..5)
        .map(|i| Tensor::randn(0f32, 1.0, (7 + i * 300, 41), &Device::Cpu).map(Some))
        .collect::<candle_core::Result<_>>()?;
    let on_gpu: Vec<Option<Tensor>> = grads
        .iter()
        .map(|g| g.as_ref().map(|g| g.to_device(&gpu)).transpose())
        .collect::<candle_core::Result<_>>()?;
    let (a, b) = (
        moe_peft_lora::global_norm(&grads)?,
        moe_peft_lora::global_norm(&on_gpu)?,
    );
    assert!(((a - b) / a).abs() < 1e-6, "{a} vs {b}");
    Ok(())
}

#[test]
fn eight_bit_adamw_matches_the_cpu_bit_for_bit() -> Result<()> {
    use moe_peft_kernels::FlatGrads;
    use moe_peft_lora::{AdamW, AdamWConfig, Optim};
    let Some(gpu) = gpu() else { return Ok(()) };
    // 8-bit with a partial last block (bf16 and f32 variables), whole blocks, and one variable
    // under min_8bit_size (f32 moments).
    // [40, 200]: 32 blocks, more than the 16 CTAs a variable gets, so they stride.
    let shapes: [&[usize]; 5] = [&[3, 1001], &[16, 256], &[300], &[40, 70], &[40, 200]];
    let dtypes = [
        DType::BF16,
        DType::F32,
        DType::F32,
        DType::BF16,
        DType::BF16,
    ];
    for optim in [Optim::Adamw8bit, Optim::PagedAdamw8bit] {
        for grad_dtype in [DType::F32, DType::BF16] {
            let cfg = AdamWConfig {
                weight_decay: 0.01,
                optim,
                min_8bit_size: 1000,
                seed: 11,
                ..Default::default()
            };
            let inits: Vec<Tensor> = shapes
                .iter()
                .zip(dtypes)
                .map(|(s, d)| Tensor::randn(0f32, 1.0, *s, &Device::Cpu)?.to_dtype(d))
                .collect::<candle_core::Result<_>>()?;
            let mk = |dev: &Device| -> Result<Vec<(String, Var)>> {
                inits
                    .iter()
                    .enumerate()
                    .map(|(i, t)| Ok((format!("p{i}"), Var::from_tensor(&t.to_device(dev)?)?)))
                    .collect()
            };
            let (vc, vg) = (mk(&Device::Cpu)?, mk(&gpu)?);
            let (fc, fg) = (
                FlatGrads::new(&vc, grad_dtype)?,
                FlatGrads::new(&vg, grad_dtype)?,
            );
            let mut oc = AdamW::new(vc.clone(), cfg.clone())?;
            let mut og = AdamW::new(vg.clone(), cfg)?;
            if optim == Optim::PagedAdamw8bit {
                assert_eq!(og.state_device_bytes(), 0, "paged state is in host memory");
            }
            for step in 0..5 {
                fc.zero()?;
                fg.zero()?;
                for (i, s) in shapes.iter().enumerate() {
                    let g = (Tensor::randn(0f32, 1.0, *s, &Device::Cpu)?
                        * (0.2 * step as f64 + 0.1))?
                        .to_dtype(grad_dtype)?;
                    fc.add(vc[i].1.as_tensor().id(), &g)?;
                    fg.add(vg[i].1.as_tensor().id(), &g.to_device(&gpu)?)?;
                }
                let clip = if step % 2 == 0 { 1.0 } else { 0.37 };
                oc.step_flat(&fc, 1e-2, clip)?;
                og.step_flat(&fg, 1e-2, clip)?;
                for (i, ((_, c), (_, g))) in vc.iter().zip(&vg).enumerate() {
                    assert_eq!(
                        bits(c.as_tensor())?,
                        bits(g.as_tensor())?,
                        "variable {i}, step {step}, {optim:?}, grads {grad_dtype:?}"
                    );
                }
            }
            // The states (codes, scales, f32 moments) are the same bytes too.
            let dir = tempfile::tempdir()?;
            let (pc, pg) = (dir.path().join("c"), dir.path().join("g"));
            oc.save(&pc)?;
            og.save(&pg)?;
            assert!(
                std::fs::read(&pc)? == std::fs::read(&pg)?,
                "saved 8-bit state differs ({optim:?}, grads {grad_dtype:?})"
            );
        }
    }
    Ok(())
}
