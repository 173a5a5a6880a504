//! CUDA vs CPU parity of the kernels: the hash dropout (plain, segmented, and dropout-add), the
//! batched casts, the grouped GEMMs and their accumulation, the row gather, and the attention
//! softmax, RMSNorm, SwiGLU and cross-entropy kernels.
//!
//! Built only with `--features cuda`; without a GPU each test says so and passes, unless
//! `MOE_PEFT_REQUIRE_CUDA=1`, which makes a missing GPU a failure. On a GPU: the dropout output — hence the mask — is
//! bit-identical on both devices for f32, bf16 and f16 inputs of several shapes (odd sizes, a
//! view at an odd offset, a transposed input), and so is the gradient through it; so are the
//! casts and the gathers; the row kernels agree within the bounds stated in
//! each test.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use moe_peft_kernels::dropout::hash_dropout;

type Result<T> = anyhow::Result<T>;

fn gpu() -> Option<Device> {
    moe_peft_kernels::cuda_device_or_skip()
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(moe_peft_kernels::bit_patterns(t)?)
}

fn assert_same(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: dims");
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtype");
    let (x, y) = (bits(a)?, bits(b)?);
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        let n = x.iter().zip(&y).filter(|(p, q)| p != q).count();
        panic!("{what}: {n} of {} differ, first at {i}", x.len());
    }
    Ok(())
}

#[test]
fn dropout_masks_match_the_cpu() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let shapes: [&[usize]; 6] = [
        &[64, 2048],  // a micro-batch of hidden states
        &[6, 1408],   // expert intermediate width
        &[3, 5, 7],   // odd, shorter than a 16-byte chunk per row
        &[1, 1],      // one element
        &[1_000_003], // odd, several grid-stride steps
        &[17, 129],   // odd rows and columns
    ];
    let keys = [0u64, 7, 0xDEAD_BEEF_CAFE_F00D, u64::MAX];
    for shape in shapes {
        let x = Tensor::randn(0f32, 1., shape, &Device::Cpu)?;
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let x = x.to_dtype(dt)?;
            let xg = x.to_device(&dev)?;
            for p in [0.05f32, 0.1, 0.5, 0.9] {
                for key in keys {
                    let a = hash_dropout(&x, p, key)?;
                    let b = hash_dropout(&xg, p, key)?;
                    assert!(b.device().same_device(&dev));
                    assert_same(&a, &b, &format!("{shape:?} {dt:?} p={p} key={key:#x}"))?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn dropout_of_views_and_gradients_match_the_cpu() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let x = Tensor::randn(0f32, 1., (37, 96), &Device::Cpu)?;
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let x = x.to_dtype(dt)?;
        let xg = x.to_device(&dev)?;
        // a contiguous view at an odd offset (no 16-byte alignment) and a transposed input
        let a = hash_dropout(&x.flatten_all()?.narrow(0, 5, 1001)?, 0.1, 42)?;
        let b = hash_dropout(&xg.flatten_all()?.narrow(0, 5, 1001)?, 0.1, 42)?;
        assert_same(&a, &b, &format!("offset view {dt:?}"))?;
        let a = hash_dropout(&x.t()?, 0.3, 9)?;
        let b = hash_dropout(&xg.t()?, 0.3, 9)?;
        assert_same(&a, &b, &format!("transposed {dt:?}"))?;
    }
    // the backward applies the same mask to the gradient
    let w = Tensor::randn(0f32, 1., (8, 300), &Device::Cpu)?;
    let mut grads = Vec::new();
    for d in [Device::Cpu, dev.clone()] {
        let v = Var::from_tensor(&w.to_device(&d)?)?;
        let y = hash_dropout(v.as_tensor(), 0.25, 1234)?;
        let loss = (y * w.to_device(&d)?)?.sum_all()?;
        let g = loss.backward()?;
        let gv = g
            .get(v.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient"))?
            .clone();
        grads.push(gv);
    }
    assert_same(&grads[0], &grads[1], "gradient")?;
    Ok(())
}

#[test]
fn segmented_dropout_matches_the_cpu() -> Result<()> {
    use moe_peft_kernels::dropout::segmented_dropout;
    let Some(gpu) = gpu() else { return Ok(()) };
    let rows = [5usize, 0, 17, 3];
    let keys = [11u64, 12, 13, 14];
    for dtype in [DType::F32, DType::BF16] {
        let x = Tensor::randn(0f32, 1.0, (25, 33), &Device::Cpu)?.to_dtype(dtype)?;
        let c = segmented_dropout(&x, 0.3, &rows, &keys)?;
        let g = segmented_dropout(&x.to_device(&gpu)?, 0.3, &rows, &keys)?;
        assert_eq!(bits(&c)?, bits(&g)?, "{dtype:?}");
        // The same masks as one dropout per segment.
        let mut off = 0;
        for (&r, &k) in rows.iter().zip(&keys) {
            let one = hash_dropout(&x.narrow(0, off, r)?, 0.3, k)?;
            assert_eq!(bits(&c.narrow(0, off, r)?)?, bits(&one)?);
            off += r;
        }
    }
    Ok(())
}

#[test]
fn fused_accumulating_kernels_match_the_cpu() -> Result<()> {
    use moe_peft_kernels::dropout::{segmented_dropout, segmented_dropout_add};
    use moe_peft_kernels::{grouped_matmul, grouped_matmul_add};
    let Some(gpu) = gpu() else { return Ok(()) };
    // Rows per group with an empty group and widths that are and are not multiples of 8.
    let rows = [37usize, 0, 64, 5];
    let keys = [3u64, 4, 5, 6];
    for (w, dtype) in [(48usize, DType::BF16), (33, DType::BF16), (40, DType::F32)] {
        let x = Tensor::randn(0f32, 1.0, (106, w), &Device::Cpu)?.to_dtype(dtype)?;
        let a = Tensor::randn(0f32, 1.0, (106, w), &Device::Cpu)?.to_dtype(dtype)?;
        // dropout-add equals dropout then add (same rounding), on both devices.
        let want = (&a + segmented_dropout(&x, 0.25, &rows, &keys)?)?;
        let ac = a.copy()?;
        segmented_dropout_add(&ac, &x, 0.25, &rows, &keys)?;
        let ag = a.to_device(&gpu)?.copy()?;
        segmented_dropout_add(&ag, &x.to_device(&gpu)?, 0.25, &rows, &keys)?;
        assert_eq!(bits(&ac)?, bits(&want)?, "CPU dropout-add, width {w}");
        assert_eq!(bits(&ag)?, bits(&want)?, "CUDA dropout-add, width {w}");
    }
    // y + 0.5·x·Wᵀ per group, accumulated by cuBLAS, against the CPU in f32.
    let x = Tensor::randn(0f32, 1.0, (106, 24), &Device::Cpu)?;
    let ws: Vec<Tensor> = (0..4)
        .map(|_| Tensor::randn(0f32, 1.0, (16, 24), &Device::Cpu))
        .collect::<candle_core::Result<_>>()?;
    let y = Tensor::randn(0f32, 1.0, (106, 16), &Device::Cpu)?;
    let wr: Vec<&Tensor> = ws.iter().collect();
    let want = (&y + (grouped_matmul(&x, &wr, &rows, true)? * 0.5)?)?;
    let cpu = grouped_matmul_add(y.copy()?, &x, &wr, &rows, true, 0.5)?;
    let wg: Vec<Tensor> = ws
        .iter()
        .map(|w| w.to_device(&gpu))
        .collect::<candle_core::Result<_>>()?;
    let wgr: Vec<&Tensor> = wg.iter().collect();
    let gpu_out = grouped_matmul_add(
        y.to_device(&gpu)?.copy()?,
        &x.to_device(&gpu)?,
        &wgr,
        &rows,
        true,
        0.5,
    )?;
    let d = (gpu_out.to_device(&Device::Cpu)? - &want)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let c = (cpu - &want)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert!(d < 1e-3 && c < 1e-5, "CUDA {d}, CPU {c}");
    Ok(())
}

#[test]
fn attention_softmax_kernels_and_row_gather_match_the_cpu() -> Result<()> {
    use moe_peft_kernels::rows::gather_rows;
    use moe_peft_kernels::softmax::{masked_softmax, softmax_backward};
    let Some(gpu) = gpu() else { return Ok(()) };
    // Largest difference relative to the largest value (at least 1).
    let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
        let b = b.to_dtype(DType::F32)?;
        let d = (a.to_device(&Device::Cpu)?.to_dtype(DType::F32)? - &b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
        Ok(d / scale)
    };
    let x = (Tensor::randn(0f32, 3.0, (2, 3, 5, 70), &Device::Cpu)?).contiguous()?;
    let causal: Vec<f32> = (0..5 * 70)
        .map(|i| if i % 70 > i / 70 + 60 { f32::MIN } else { 0.0 })
        .collect();
    for mask in [
        None,
        Some(Tensor::from_vec(
            causal.clone(),
            (1, 1, 5, 70),
            &Device::Cpu,
        )?),
        Some(Tensor::randn(0f32, 1.0, (2, 1, 5, 70), &Device::Cpu)?),
    ] {
        for (dtype, tol) in [(DType::F32, 1e-6f32), (DType::BF16, 8e-3)] {
            let xc = x.to_dtype(dtype)?;
            let mc = mask.as_ref().map(|m| m.to_dtype(dtype)).transpose()?;
            let c = masked_softmax(&xc, mc.as_ref())?;
            let mg = mc.as_ref().map(|m| m.to_device(&gpu)).transpose()?;
            let g = masked_softmax(&xc.to_device(&gpu)?, mg.as_ref())?;
            let d = max_diff(&g, &c)?;
            assert!(d <= tol, "softmax {dtype:?}: {d}");
            let dp = Tensor::randn(0f32, 1.0, (2, 3, 5, 70), &Device::Cpu)?.to_dtype(dtype)?;
            let bc = softmax_backward(&c, &dp)?;
            let bg = softmax_backward(&c.to_device(&gpu)?, &dp.to_device(&gpu)?)?;
            let d = max_diff(&bg, &bc)?;
            assert!(d <= tol, "softmax backward {dtype:?}: {d}");
        }
    }
    // Row gather: bit-identical to index_select (16-byte rows, and a fallback width).
    for (w, dtype) in [(2048usize, DType::BF16), (12, DType::F32), (7, DType::BF16)] {
        let x = Tensor::randn(0f32, 1.0, (50, w), &Device::Cpu)?.to_dtype(dtype)?;
        let idx: Vec<u32> = (0..123u32).map(|i| (i * 37 + 5) % 50).collect();
        let idx = Tensor::new(idx.as_slice(), &Device::Cpu)?;
        let want = x.index_select(&idx, 0)?;
        let got = gather_rows(&x.to_device(&gpu)?, &idx.to_device(&gpu)?)?;
        assert_eq!(bits(&got)?, bits(&want)?, "gather {w} {dtype:?}");
    }
    Ok(())
}

#[test]
fn rms_norm_kernels_match_the_cpu() -> Result<()> {
    use moe_peft_kernels::norm::{rms_norm, rms_norm_backward};
    let Some(gpu) = gpu() else { return Ok(()) };
    let x = Tensor::randn(0f32, 1.0, (3, 7, 2048), &Device::Cpu)?;
    let w = Tensor::randn(1f32, 0.2, 2048, &Device::Cpu)?;
    let dy = Tensor::randn(0f32, 1.0, (3, 7, 2048), &Device::Cpu)?;
    // Relative to the largest value: f32 up to summation order, bf16 within 2 ulps.
    for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 1.6e-2)] {
        let (xc, dc) = (x.to_dtype(dtype)?, dy.to_dtype(dtype)?);
        let (xg, wg, dg) = (xc.to_device(&gpu)?, w.to_device(&gpu)?, dc.to_device(&gpu)?);
        for (what, c, g) in [
            (
                "forward",
                rms_norm(&xc, &w, 1e-6)?,
                rms_norm(&xg, &wg, 1e-6)?,
            ),
            (
                "backward",
                rms_norm_backward(&xc, &w, &dc, 1e-6)?,
                rms_norm_backward(&xg, &wg, &dg, 1e-6)?,
            ),
        ] {
            let d = (g.to_device(&Device::Cpu)?.to_dtype(DType::F32)? - c.to_dtype(DType::F32)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            let scale = c
                .to_dtype(DType::F32)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?
                .max(1.0);
            assert!(d <= tol * scale, "{what} {dtype:?}: {d} (scale {scale})");
        }
    }
    Ok(())
}

#[test]
fn swiglu_kernels_match_the_cpu() -> Result<()> {
    use moe_peft_kernels::swiglu::{swiglu, swiglu_backward};
    let Some(gpu) = gpu() else { return Ok(()) };
    let g = Tensor::randn(0f32, 2.0, (37, 1408), &Device::Cpu)?;
    let u = Tensor::randn(0f32, 1.0, (37, 1408), &Device::Cpu)?;
    let da = Tensor::randn(0f32, 1.0, (37, 1408), &Device::Cpu)?;
    for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 1.6e-2)] {
        let (gc, uc, dc) = (g.to_dtype(dtype)?, u.to_dtype(dtype)?, da.to_dtype(dtype)?);
        let (gg, ug, dg) = (
            gc.to_device(&gpu)?,
            uc.to_device(&gpu)?,
            dc.to_device(&gpu)?,
        );
        let (bc, bg) = (
            swiglu_backward(&gc, &uc, &dc)?,
            swiglu_backward(&gg, &ug, &dg)?,
        );
        for (what, c, g) in [
            ("forward", swiglu(&gc, &uc)?, swiglu(&gg, &ug)?),
            ("dg", bc.0, bg.0),
            ("du", bc.1, bg.1),
        ] {
            let c = c.to_dtype(DType::F32)?;
            let d = (g.to_device(&Device::Cpu)?.to_dtype(DType::F32)? - &c)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            let scale = c.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
            // f32: expf on the GPU vs exp on the CPU; bf16: within 2 ulps of the largest value.
            assert!(d <= tol * scale, "{what} {dtype:?}: {d} (scale {scale})");
        }
    }
    Ok(())
}

#[test]
fn cross_entropy_kernels_match_the_cpu() -> Result<()> {
    use moe_peft_kernels::xent::{cross_entropy_rows, softmax_rows};
    let Some(gpu) = gpu() else { return Ok(()) };
    let l = Tensor::randn(0f32, 4.0, (9, 102400), &Device::Cpu)?;
    let t = Tensor::new(&[0u32, 102399, 5, 5, 777, 1, 2, 3, 50000], &Device::Cpu)?;
    for (dtype, tol) in [(DType::F32, 2e-5f32), (DType::BF16, 2e-5)] {
        let lc = l.to_dtype(dtype)?;
        let lg = lc.to_device(&gpu)?;
        let (c, g) = (
            cross_entropy_rows(&lc, &t)?,
            cross_entropy_rows(&lg, &t.to_device(&gpu)?)?,
        );
        let d = (g.to_device(&Device::Cpu)? - &c)?
            .abs()?
            .max(0)?
            .to_scalar::<f32>()?;
        let scale = c.abs()?.max(0)?.to_scalar::<f32>()?;
        assert!(d <= tol * scale, "loss {dtype:?}: {d} of {scale}");
        let (pc, pg) = (softmax_rows(&lc)?, softmax_rows(&lg)?);
        let d = (pg.to_device(&Device::Cpu)?.to_dtype(DType::F32)? - pc.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        // Relative to the largest probability: f32 up to the GPU's f32 partial sums over
        // 400 terms per thread, bf16 within 2 ulps.
        let pmax = pc
            .to_dtype(DType::F32)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let ptol = if dtype == DType::F32 { 1e-5 } else { 8e-3 };
        assert!(d <= ptol * pmax, "softmax {dtype:?}: {d} (largest {pmax})");
    }
    Ok(())
}

#[test]
fn batched_adapter_casts_equal_to_dtype() -> Result<()> {
    use moe_peft_kernels::cast::cast_many;
    let Some(gpu) = gpu() else { return Ok(()) };
    let ts: Vec<Tensor> = [(64usize, 2048usize), (1408, 64), (3, 5), (64, 7)]
        .iter()
        .map(|&s| Tensor::randn(0f32, 1.0, s, &gpu))
        .collect::<candle_core::Result<_>>()?;
    let got = cast_many(&ts.iter().collect::<Vec<_>>(), DType::BF16)?;
    for (t, g) in ts.iter().zip(&got) {
        assert_eq!(bits(g)?, bits(&t.to_dtype(DType::BF16)?)?);
    }
    Ok(())
}
#[test]
fn grouped_gemms_match_the_cpu() -> Result<()> {
    use moe_peft_kernels::{grouped_matmul, grouped_matmul_tn};
    let Some(gpu) = gpu() else { return Ok(()) };
    let counts = [37usize, 0, 64, 5, 130];
    let r: usize = counts.iter().sum();
    for dtype in [DType::F32, DType::BF16] {
        let x = Tensor::randn(0f32, 1.0, (r, 96), &Device::Cpu)?.to_dtype(dtype)?;
        let ws: Vec<Tensor> = (0..counts.len())
            .map(|_| Tensor::randn(0f32, 1.0, (80, 96), &Device::Cpu)?.to_dtype(dtype))
            .collect::<candle_core::Result<_>>()?;
        let wg: Vec<Tensor> = ws
            .iter()
            .map(|w| w.to_device(&gpu))
            .collect::<candle_core::Result<_>>()?;
        let xg = x.to_device(&gpu)?;
        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
            let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            let b = b.to_dtype(DType::F32)?;
            Ok(
                ((&a - &b)?.sqr()?.sum_all()?.sqrt()? / b.sqr()?.sum_all()?.sqrt()?)?
                    .to_scalar::<f32>()?,
            )
        };
        // The CPU reference runs in f32 on the same (rounded) inputs: candle's CPU matmul has
        // no bf16 kernel.
        let x32 = x.to_dtype(DType::F32)?;
        let ws32: Vec<Tensor> = ws
            .iter()
            .map(|w| w.to_dtype(DType::F32))
            .collect::<candle_core::Result<_>>()?;
        let y_c = grouped_matmul(&x32, &ws32.iter().collect::<Vec<_>>(), &counts, true)?;
        let y_g = grouped_matmul(&xg, &wg.iter().collect::<Vec<_>>(), &counts, true)?;
        assert!(rel(&y_g, &y_c)? < tol, "x·wᵀ {dtype:?}");
        let z_c = grouped_matmul(&y_c, &ws32.iter().collect::<Vec<_>>(), &counts, false)?;
        let z_g = grouped_matmul(&y_g, &wg.iter().collect::<Vec<_>>(), &counts, false)?;
        assert!(rel(&z_g, &z_c)? < tol, "y·w {dtype:?}");
        let t_c = grouped_matmul_tn(&x32, &y_c, &counts)?;
        let t_g = grouped_matmul_tn(&xg, &y_g, &counts)?;
        assert!(rel(&t_g, &t_c)? < tol, "xᵀ·y {dtype:?}");
        let empty = t_g
            .get(1)?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert_eq!(empty, 0.0, "empty group");
    }
    // The one-launch segmented kernel against cuBLAS's grouped GEMM at the experts' shapes
    // (64 groups, empty ones among them; r = 64 against 2048 and 1408 columns).
    // (Groups below the mean size that switches to cuBLAS.)
    let counts: Vec<usize> = (0..64).map(|i| (i * 37) % 150).collect();
    assert!(
        counts.iter().sum::<usize>() <= 64 * moe_peft_kernels::grouped::TN_KERNEL_MAX_MEAN_ROWS
    );
    let r: usize = counts.iter().sum();
    for dtype in [DType::BF16, DType::F16] {
        // (67 × 45: rows that are not whole 16-byte words, read value by value.)
        for (m, n) in [(64usize, 2048usize), (1408, 64), (67, 45)] {
            let a = Tensor::randn(0f32, 1.0, (r, m), &gpu)?.to_dtype(dtype)?;
            let b = Tensor::randn(0f32, 1.0, (r, n), &gpu)?.to_dtype(dtype)?;
            let k = grouped_matmul_tn(&a, &b, &counts)?;
            moe_peft_kernels::grouped::set_tn_kernel(false);
            let c = grouped_matmul_tn(&a, &b, &counts);
            moe_peft_kernels::grouped::set_tn_kernel(true);
            let (k, c) = (k.to_dtype(DType::F32)?, c?.to_dtype(DType::F32)?);
            let rel = ((&k - &c)?.sqr()?.sum_all()?.sqrt()? / c.sqr()?.sum_all()?.sqrt()?)?
                .to_scalar::<f32>()?;
            assert!(rel < 1e-2, "segmented xᵀ·y {dtype:?} {m}×{n}: {rel}");
            let zero = k.get(0)?.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert_eq!(zero, 0.0, "empty group");
        }
    }
    Ok(())
}

/// Rank `r`'s buffer in the collective tests: `(i + 1) · (r + 1)` at position `i`.
fn rank_values(r: usize, n: usize, dev: &Device) -> Result<Tensor> {
    Ok((Tensor::arange(1f32, n as f32 + 1., dev)? * (r as f64 + 1.))?)
}

/// What a sum over `world` ranks of [`rank_values`] gives at `i`, in `dtype` (each rank's
/// value rounded to `dtype` first, the sum rounded once more).
fn summed(world: usize, i: usize, dtype: DType) -> Result<f32> {
    let round = |x: f32| -> Result<f32> {
        Ok(Tensor::new(&[x], &Device::Cpu)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?[0])
    };
    let mut s = 0f32;
    for r in 0..world {
        s += round((i as f32 + 1.) * (r as f32 + 1.))?;
    }
    round(s)
}

#[test]
fn collectives_on_gpu_tensors_write_in_place() -> Result<()> {
    use moe_peft_kernels::comm::{Communicator, ThreadGroup};
    let Some(dev) = gpu() else { return Ok(()) };
    let world = 3;
    let (n, off, len) = (1000usize, 7usize, 501usize);
    let outs = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(world)?
            .into_iter()
            .map(|c| {
                let dev = dev.clone();
                s.spawn(move || -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
                    let r = c.rank();
                    // A view at an odd offset of a larger buffer: only the view changes.
                    let full = rank_values(r, n, &dev)?;
                    c.all_reduce_sum(&full.narrow(0, off, len)?)?;
                    let half = rank_values(r, 64, &dev)?.to_dtype(DType::BF16)?;
                    c.all_reduce_sum(&half.narrow(0, 3, 50)?)?;
                    let b = rank_values(r, 33, &dev)?;
                    c.broadcast(&b, 2)?;
                    let f = |t: &Tensor| -> Result<Vec<f32>> {
                        Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?)
                    };
                    Ok((f(&full)?, f(&half)?, f(&b)?))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("a rank panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    for (r, (full, half, b)) in outs.iter().enumerate() {
        for (i, v) in full.iter().enumerate() {
            let want = if (off..off + len).contains(&i) {
                summed(world, i, DType::F32)?
            } else {
                (i as f32 + 1.) * (r as f32 + 1.)
            };
            assert_eq!(*v, want, "rank {r} f32 [{i}]");
        }
        for (i, v) in half.iter().enumerate() {
            let want = if (3..53).contains(&i) {
                summed(world, i, DType::BF16)?
            } else {
                summed(1, i, DType::BF16)? * (r as f32 + 1.)
            };
            assert_eq!(*v, want, "rank {r} bf16 [{i}]");
        }
        for (i, v) in b.iter().enumerate() {
            assert_eq!(*v, (i as f32 + 1.) * 3., "rank {r} broadcast [{i}]");
        }
    }
    Ok(())
}

/// A gradient buffer of more than 2³² elements (a 16B model's, in bf16): gradients added past
/// element 2³², the norm over all of it, and zeroing all of it (candle's fill kernel counts
/// with 32 bits and never returns on such a buffer; the script's per-test timeout ends it).
#[test]
fn flat_gradients_beyond_two_to_the_32_elements() -> Result<()> {
    use moe_peft_kernels::FlatGrads;
    let Some(dev) = gpu() else { return Ok(()) };
    let big = (1usize << 31) + 5;
    let mk =
        |n: usize| -> Result<Var> { Ok(Var::from_tensor(&Tensor::zeros(n, DType::U8, &dev)?)?) };
    let vars = vec![
        ("a".to_string(), mk(big)?),
        ("b".to_string(), mk(big)?),
        ("c".to_string(), mk(1000)?),
        ("d".to_string(), mk(1000)?),
    ];
    let f = FlatGrads::new(&vars, DType::BF16)?;
    assert!(f.offsets()[2] > 1 << 32);
    let g = (Tensor::ones(1000, DType::BF16, &dev)? * 3.)?;
    f.add(vars[2].1.as_tensor().id(), &g)?;
    assert_eq!(
        f.view(2)?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        vec![3f32; 1000]
    );
    // A stacked add at 64-bit offsets.
    let ids = [vars[3].1.as_tensor().id(), vars[2].1.as_tensor().id()];
    f.add_stacked(&ids, &Tensor::stack(&[&g, &g], 0)?)?;
    assert_eq!(
        f.view(2)?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        vec![6f32; 1000]
    );
    assert_eq!(
        f.view(3)?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        vec![3f32; 1000]
    );
    assert!((f.norm()? - (45000f64).sqrt()).abs() < 1e-9);
    f.zero()?;
    assert_eq!(f.norm()?, 0.0);
    assert!(f.to_vec()?.iter().all(|g| g.is_none()));
    Ok(())
}

/// A stacked gradient add (one launch for a layer's expert gradients of one kind) equals the
/// CPU twin bit for bit, for every buffer and gradient dtype.
#[test]
fn stacked_flat_gradient_adds_match_the_cpu() -> Result<()> {
    use moe_peft_kernels::FlatGrads;
    let Some(dev) = gpu() else { return Ok(()) };
    for (dtype, gdt) in [
        (DType::F32, DType::F32),
        (DType::F32, DType::BF16),
        (DType::BF16, DType::F32),
        (DType::BF16, DType::BF16),
    ] {
        let mut sums = Vec::new();
        for d in [&Device::Cpu, &dev] {
            let vars: Vec<(String, Var)> = (0..70)
                .map(|i| Ok((format!("v{i}"), Var::zeros((7, 333), DType::F32, d)?)))
                .collect::<Result<_>>()?;
            let f = FlatGrads::new(&vars, dtype)?;
            let pick: Vec<usize> = (0..70).rev().step_by(3).collect();
            let ids: Vec<_> = pick.iter().map(|&i| vars[i].1.as_tensor().id()).collect();
            let g = Tensor::arange(0f32, (pick.len() * 7 * 333) as f32, &Device::Cpu)?
                .affine(1e-3, -0.5)?
                .sin()?
                .reshape((pick.len(), 7, 333))?
                .to_dtype(gdt)?;
            f.add_stacked(&ids, &g.to_device(d)?)?;
            f.add_stacked(&ids, &g.to_device(d)?)?;
            sums.push(f.buffer().to_device(&Device::Cpu)?);
        }
        assert_same(&sums[0], &sums[1], "stacked flat gradient add")?;
    }
    Ok(())
}

/// The MoE combine and both its gradients equal the CPU twin bit for bit (f32, bf16, f16;
/// a hidden size that is not a multiple of the block).
#[test]
fn moe_combine_kernels_match_the_cpu() -> Result<()> {
    use moe_peft_kernels::combine::{
        combine_rows_backward_rows, combine_rows_backward_weights, combine_rows_forward,
    };
    let Some(dev) = gpu() else { return Ok(()) };
    let cpu = Device::Cpu;
    for (n, k, h) in [(300usize, 6usize, 2048usize), (37, 4, 1000)] {
        let nk = n * k;
        let inverse: Vec<u32> = (0..nk as u64)
            .map(|i| ((i * 7919) % nk as u64) as u32)
            .collect();
        let mut order = vec![0u32; nk];
        for (o, &p) in inverse.iter().enumerate() {
            order[p as usize] = o as u32;
        }
        let inv = Tensor::new(inverse.as_slice(), &cpu)?;
        let ord = Tensor::new(order.as_slice(), &cpu)?;
        let w = Tensor::rand(0f32, 1., (n, k), &cpu)?;
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let ys = Tensor::randn(0f32, 1., (nk, h), &cpu)?.to_dtype(dt)?;
            let g = Tensor::randn(0f32, 1., (n, h), &cpu)?.to_dtype(dt)?;
            let on = |d: &Device| -> Result<Vec<Tensor>> {
                let (ys, g, w) = (ys.to_device(d)?, g.to_device(d)?, w.to_device(d)?);
                let (inv, ord) = (inv.to_device(d)?, ord.to_device(d)?);
                Ok(vec![
                    combine_rows_forward(&ys, &w, &inv)?.to_device(&cpu)?,
                    combine_rows_backward_rows(&g, &w, &ord)?.to_device(&cpu)?,
                    combine_rows_backward_weights(&g, &ys, &w, &inv)?.to_device(&cpu)?,
                ])
            };
            let (c, gpu_out) = (on(&cpu)?, on(&dev)?);
            // An index out of range: an error on the CPU, a zero term on CUDA (no bad read).
            let mut bad = inverse.clone();
            bad[0] = u32::MAX;
            let bad = Tensor::new(bad.as_slice(), &dev)?;
            let (ysg, wg) = (ys.to_device(&dev)?, w.to_device(&dev)?);
            let y = combine_rows_forward(&ysg, &wg, &bad)?.to_dtype(DType::F32)?;
            assert!(y.sum_all()?.to_scalar::<f32>()?.is_finite());
            assert!(combine_rows_forward(&ys, &w, &bad.to_device(&cpu)?).is_err());
            for (what, (a, b)) in ["forward", "row gradients", "weight gradients"]
                .iter()
                .zip(c.iter().zip(&gpu_out))
            {
                assert_same(a, b, &format!("combine {what} {dt:?} {n}×{k}×{h}"))?;
            }
        }
    }
    Ok(())
}

/// The heads' split/merge transpose by row gather equals the CPU's strided copy bit for bit
/// (queries and grouped key/value heads, bf16 and f32, a row size without 16-byte words).
#[test]
fn head_transposes_match_the_cpu() -> Result<()> {
    use moe_peft_kernels::rows::swap_dims12;
    let Some(dev) = gpu() else { return Ok(()) };
    for (shape, dt) in [
        ((2, 33, 16, 128), DType::BF16),
        ((3, 5, 4, 64), DType::F32),
        ((2, 7, 3, 5), DType::BF16),
    ] {
        let x = Tensor::randn(0f32, 1., shape, &Device::Cpu)?.to_dtype(dt)?;
        let want = swap_dims12(&x)?;
        let got = swap_dims12(&x.to_device(&dev)?)?;
        // Twice: the second call takes the cached row order.
        let again = swap_dims12(&x.to_device(&dev)?)?;
        assert_same(&want, &got.to_device(&Device::Cpu)?, "heads transpose")?;
        assert_same(
            &want,
            &again.to_device(&Device::Cpu)?,
            "heads transpose, cached",
        )?;
        assert_eq!(want.dims(), &[shape.0, shape.2, shape.1, shape.3]);
    }
    Ok(())
}
