//! CUDA vs CPU parity of the NF4/FP4 and int8 kernels.
//!
//! Built only with `--features cuda`; without a GPU every test says so and passes, unless
//! `MOE_PEFT_REQUIRE_CUDA=1`, which makes a missing GPU a failure. On a GPU they check, for DeepSeekMoE-like shapes and odd
//! sizes (partial blocks, odd element counts, partial nested blocks), every input dtype and every
//! output dtype:
//! * quantization: packed bytes and fp32 absmax bit-identical with the CPU; with double
//!   quantization the offset within 2 ulp and the 8-bit codes and nested absmax identical with
//!   the CPU reference computed from the same fp32 absmax and the GPU's offset (identical with
//!   the CPU's own when the offsets agree, which is the norm);
//! * dequantization: dequantizing the same stored state gives bit-identical values on both
//!   devices (f32, bf16, f16, f64), also from misaligned views;
//! * int8: codes and row absmax identical, dequantized values bit-identical;
//! * several tensors dequantized in one launch equal each one dequantized alone.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use moe_peft_quant::dynamic::{dynamic_map, quantize_blockwise_8bit};
use moe_peft_quant::nf4::{quantize_4bit, InElem, NF4_THRESHOLDS};
use moe_peft_quant::{FourBitAbsmax, FourBitConfig, FourBitTensor, Int8Tensor, QuantType};

type Result<T> = anyhow::Result<T>;

fn gpu() -> Option<Device> {
    moe_peft_kernels::cuda_device_or_skip()
}

const FLOATS: [DType; 4] = [DType::F32, DType::BF16, DType::F16, DType::F64];

fn u8s(t: &Tensor) -> Result<Vec<u8>> {
    Ok(t.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<u8>()?)
}

fn f32_bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f32::to_bits)
        .collect())
}

/// The raw bits of any float tensor, widened to u64.
fn raw_bits(t: &Tensor) -> Result<Vec<u64>> {
    let t = t.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits() as u64)
            .collect(),
        DType::F64 => t.to_vec1::<f64>()?.iter().map(|v| v.to_bits()).collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .map(|v| v.to_bits() as u64)
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .map(|v| v.to_bits() as u64)
            .collect(),
        other => anyhow::bail!("not a float dtype: {other:?}"),
    })
}

fn assert_bits_eq(a: &[u64], b: &[u64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        let n = a.iter().zip(b).filter(|(x, y)| x != y).count();
        panic!(
            "{what}: {n} of {} differ, first at {i}: {:#x} vs {:#x}",
            a.len(),
            a[i],
            b[i]
        );
    }
}

fn ulps(a: f32, b: f32) -> u32 {
    let key = |v: f32| {
        let b = v.to_bits() as i64;
        if b < 0x8000_0000 {
            b
        } else {
            0x8000_0000 - b
        }
    };
    (key(a) - key(b)).unsigned_abs() as u32
}

/// The CPU's fp32 absmax of `w` (flattened) as its own blockwise kernel computes it.
fn cpu_absmax(w: &Tensor, bs: usize, qt: QuantType) -> Result<Vec<f32>> {
    let flat = w.flatten_all()?.to_device(&Device::Cpu)?;
    fn go<T: InElem + candle_core::WithDType>(
        t: &Tensor,
        bs: usize,
        qt: QuantType,
    ) -> Result<Vec<f32>> {
        Ok(quantize_4bit(&t.to_vec1::<T>()?, bs, qt)?.1)
    }
    match flat.dtype() {
        DType::F32 => go::<f32>(&flat, bs, qt),
        DType::F64 => go::<f64>(&flat, bs, qt),
        DType::BF16 => go::<half::bf16>(&flat, bs, qt),
        DType::F16 => go::<half::f16>(&flat, bs, qt),
        other => anyhow::bail!("not a float dtype: {other:?}"),
    }
}

/// Quantizes `w` (on the CPU) on both devices and checks the parts, then dequantizes the same
/// states on both devices in every dtype.
fn check_quantize(w_cpu: &Tensor, dev: &Device, cfg: &FourBitConfig, what: &str) -> Result<()> {
    let what = format!("{what} {:?} {cfg:?}", w_cpu.dtype());
    let q_cpu = FourBitTensor::quantize(w_cpu, cfg)?;
    let w_gpu = w_cpu.to_device(dev)?;
    let q_gpu = FourBitTensor::quantize(&w_gpu, cfg)?;
    assert!(
        q_gpu.device().same_device(dev),
        "{what}: parts stay on the GPU"
    );
    assert_eq!(q_gpu.dims(), q_cpu.dims());
    assert_eq!(q_gpu.dtype(), q_cpu.dtype());
    assert_eq!(u8s(q_gpu.packed())?, u8s(q_cpu.packed())?, "{what}: packed");
    match (q_cpu.absmax(), q_gpu.absmax()) {
        (FourBitAbsmax::Fp32(a), FourBitAbsmax::Fp32(b)) => {
            assert_eq!(f32_bits(a)?, f32_bits(b)?, "{what}: fp32 absmax");
        }
        (FourBitAbsmax::Double(a), FourBitAbsmax::Double(b)) => {
            assert_eq!(f32_bits(&a.map)?, f32_bits(&b.map)?, "{what}: map");
            assert_eq!(a.block_size, b.block_size);
            let d = ulps(a.offset, b.offset);
            assert!(
                d <= 2,
                "{what}: offset {} vs {} ({d} ulp)",
                a.offset,
                b.offset
            );
            // the CPU reference from the same fp32 absmax and the GPU's offset
            let absmax = cpu_absmax(w_cpu, cfg.block_size, cfg.quant_type)?;
            let centered: Vec<f32> = absmax.iter().map(|&v| v - b.offset).collect();
            let (codes, nested) = quantize_blockwise_8bit(&centered, dynamic_map(), b.block_size)?;
            assert_eq!(u8s(&b.codes)?, codes, "{what}: absmax codes");
            let nested_bits: Vec<u32> = nested.iter().map(|v| v.to_bits()).collect();
            assert_eq!(
                f32_bits(&b.nested_absmax)?,
                nested_bits,
                "{what}: nested absmax"
            );
            if d == 0 {
                assert_eq!(u8s(&a.codes)?, u8s(&b.codes)?, "{what}: codes vs CPU");
                assert_eq!(
                    f32_bits(&a.nested_absmax)?,
                    f32_bits(&b.nested_absmax)?,
                    "{what}: nested vs CPU"
                );
            } else {
                eprintln!("{what}: offsets differ by {d} ulp (summation order)");
            }
        }
        _ => panic!("{what}: absmax kinds differ"),
    }
    // the same stored state dequantized on both devices
    for q in [&q_cpu, &q_gpu] {
        let on_cpu = q.to_device(&Device::Cpu)?;
        let on_gpu = q.to_device(dev)?;
        assert_eq!(
            f32_bits(&on_gpu.absmax_f32()?)?,
            f32_bits(&on_cpu.absmax_f32()?)?,
            "{what}: absmax_f32"
        );
        for dt in FLOATS {
            let a = on_cpu.dequantize(dt)?;
            let b = on_gpu.dequantize(dt)?;
            assert!(b.device().same_device(dev));
            assert_eq!(a.dims(), b.dims());
            assert_eq!(b.dtype(), dt);
            assert_bits_eq(
                &raw_bits(&a)?,
                &raw_bits(&b)?,
                &format!("{what}: dequantized {dt:?}"),
            );
        }
    }
    Ok(())
}

fn randn(shape: &[usize], std: f64, seed_shift: f64) -> Result<Tensor> {
    let t = Tensor::randn(0f32, 1., shape, &Device::Cpu)?;
    // a few larger-magnitude rows so that blocks get different absmax values
    let n = t.elem_count();
    let ramp = Tensor::arange(0u32, n as u32, &Device::Cpu)?
        .to_dtype(DType::F32)?
        .affine(1.0 / n as f64, seed_shift)?
        .reshape(shape)?;
    Ok((t * std)?.mul(&ramp.exp()?)?)
}

#[test]
fn quantize_and_dequantize_match_the_cpu() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let shapes: [&[usize]; 7] = [
        &[1408, 2048], // routed expert gate/up
        &[2048, 1408], // routed expert down
        &[163, 129],   // odd count, partial block, 2 nested blocks (last partial)
        &[3, 5, 7],    // 105 elements: 2 blocks of 64, odd tail
        &[1, 33],      // a single partial block
        &[7],          // smaller than one 8-element chunk
        &[257, 1],     // odd, 5 blocks
    ];
    let configs = [
        FourBitConfig::default(),
        FourBitConfig::nf4_no_double_quant(),
        FourBitConfig::fp4(),
        FourBitConfig {
            quant_type: QuantType::Fp4,
            double_quant: false,
            ..FourBitConfig::default()
        },
    ];
    for (k, shape) in shapes.iter().enumerate() {
        let w = randn(shape, 0.02, -1.0 + k as f64 * 0.1)?;
        for dt in FLOATS {
            let w = w.to_dtype(dt)?;
            for cfg in &configs {
                check_quantize(&w, &dev, cfg, &format!("{shape:?}"))?;
            }
        }
    }
    Ok(())
}

#[test]
fn every_block_size_matches_the_cpu() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let w = randn(&[97, 211], 1.0, 0.0)?; // 20467 elements: partial blocks at every size
    for bs in [32usize, 64, 128, 256, 512, 1024, 2048, 4096] {
        for dq_bs in [256usize, 32] {
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                let cfg = FourBitConfig {
                    quant_type: qt,
                    block_size: bs,
                    double_quant: true,
                    dq_block_size: dq_bs,
                };
                check_quantize(&w.to_dtype(DType::BF16)?, &dev, &cfg, "97x211")?;
                let cfg = FourBitConfig {
                    double_quant: false,
                    ..cfg
                };
                check_quantize(&w, &dev, &cfg, "97x211")?;
            }
        }
    }
    Ok(())
}

/// The largest DeepSeekMoE-16B projection (dense layer-0 MLP), bf16.
#[test]
fn dense_mlp_sized_matrix_matches_the_cpu() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let w = randn(&[10944, 2048], 0.02, -0.5)?.to_dtype(DType::BF16)?;
    check_quantize(&w, &dev, &FourBitConfig::default(), "10944x2048")
}

/// Values on and next to every decision threshold (in a block whose absmax is exactly 1, so the
/// scaled values are the values themselves), signed zeros, NaN and infinities.
#[test]
fn thresholds_and_special_values_match_the_cpu() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let mut v: Vec<f32> = Vec::new();
    let fp4_thr = [
        0.002_604_17f32,
        0.085_937_5,
        0.208_333_33,
        0.291_666_67,
        0.416_666_7,
        0.583_333,
        0.833_333_3,
    ];
    for &t in NF4_THRESHOLDS.iter().chain(fp4_thr.iter()) {
        for s in [1.0f32, -1.0] {
            let t = t * s;
            v.extend([
                t,
                f32::from_bits(t.to_bits() + 1),
                f32::from_bits(t.to_bits() - 1),
            ]);
        }
    }
    // pad into blocks of 32, each starting with 1.0 so its absmax is exactly 1
    let mut blocks: Vec<f32> = Vec::new();
    for chunk in v.chunks(31) {
        blocks.push(1.0);
        blocks.extend_from_slice(chunk);
        blocks.resize(blocks.len().div_ceil(32) * 32, 0.0);
    }
    // an all-zero block, a block of -0.0, tiny subnormals, NaN and infinities
    blocks.extend([0.0f32; 32]);
    blocks.extend([-0.0f32; 32]);
    blocks.extend((0..32).map(|i| f32::from_bits(i + 1)));
    blocks.extend([f32::NAN, 0.5, -0.25, f32::NAN].repeat(8));
    blocks.extend([f32::INFINITY, 1.0, -2.0, 0.0].repeat(8));
    blocks.extend([f32::NEG_INFINITY, 1e30, -1e-30, 3.0].repeat(8));
    blocks.push(0.3); // odd tail
    let n = blocks.len();
    let w = Tensor::from_vec(blocks, n, &Device::Cpu)?;
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let cfg = FourBitConfig {
            quant_type: qt,
            block_size: 32,
            double_quant: false,
            ..FourBitConfig::default()
        };
        let a = FourBitTensor::quantize(&w, &cfg)?;
        let b = FourBitTensor::quantize(&w.to_device(&dev)?, &cfg)?;
        assert_eq!(u8s(a.packed())?, u8s(b.packed())?, "{qt}: packed");
        assert_eq!(
            f32_bits(&a.absmax_f32()?)?,
            f32_bits(&b.absmax_f32()?)?,
            "{qt}: absmax"
        );
        // finite parts dequantize identically (an inf absmax makes NaN, whose payload is
        // platform-specific)
        let finite = 32 * v.len().div_ceil(31) + 96;
        let da = a.dequantize(DType::F32)?.narrow(0, 0, finite)?;
        let db = b.dequantize(DType::F32)?.narrow(0, 0, finite)?;
        assert_bits_eq(
            &raw_bits(&da)?,
            &raw_bits(&db)?,
            &format!("{qt}: dequantized"),
        );
        // double quantization of the finite part: both sides agree on the codes
        let cfg = FourBitConfig {
            double_quant: true,
            ..cfg
        };
        let a = FourBitTensor::quantize(&w.narrow(0, 0, finite)?, &cfg)?;
        let b = FourBitTensor::quantize(&w.narrow(0, 0, finite)?.to_device(&dev)?, &cfg)?;
        assert_eq!(u8s(a.packed())?, u8s(b.packed())?, "{qt} dq: packed");
        match (a.absmax(), b.absmax()) {
            (FourBitAbsmax::Double(x), FourBitAbsmax::Double(y)) => {
                assert!(ulps(x.offset, y.offset) <= 2);
                if x.offset == y.offset {
                    assert_eq!(u8s(&x.codes)?, u8s(&y.codes)?, "{qt} dq: codes");
                }
            }
            _ => panic!("expected double quantization"),
        }
    }
    Ok(())
}

/// Non-contiguous inputs and views at odd offsets (no 16-byte alignment: the kernels' scalar
/// paths) give the same results.
#[test]
fn strided_and_misaligned_inputs_match_the_cpu() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let w = randn(&[130, 96], 0.5, 0.0)?;
    for dt in FLOATS {
        let w = w.to_dtype(dt)?;
        let wt = w.t()?;
        check_quantize(&wt, &dev, &FourBitConfig::default(), "transposed")?;
        let off = w.flatten_all()?.narrow(0, 3, w.elem_count() - 3)?;
        let q_cpu = FourBitTensor::quantize(&off, &FourBitConfig::default())?;
        let q_gpu = FourBitTensor::quantize(&off.to_device(&dev)?, &FourBitConfig::default())?;
        assert_eq!(
            u8s(q_gpu.packed())?,
            u8s(q_cpu.packed())?,
            "offset view {dt:?}"
        );
    }
    // a packed buffer starting one byte into its storage (the dequantizer's byte-load path)
    let q = FourBitTensor::quantize(&w, &FourBitConfig::nf4_no_double_quant())?;
    let padded = Tensor::cat(
        &[&Tensor::zeros(1, DType::U8, &Device::Cpu)?, q.packed()],
        0,
    )?
    .to_device(&dev)?;
    let packed = padded.narrow(0, 1, q.packed().elem_count())?;
    let absmax = match q.absmax() {
        FourBitAbsmax::Fp32(a) => FourBitAbsmax::Fp32(a.to_device(&dev)?),
        FourBitAbsmax::Double(_) => anyhow::bail!("no double quantization was requested"),
    };
    let view = FourBitTensor::from_parts(
        packed,
        absmax,
        *q.code(),
        q.shape().clone(),
        q.dtype(),
        q.block_size(),
        q.quant_type(),
    )?;
    for dt in FLOATS {
        assert_bits_eq(
            &raw_bits(&q.dequantize(dt)?)?,
            &raw_bits(&view.dequantize(dt)?)?,
            &format!("misaligned packed {dt:?}"),
        );
    }
    Ok(())
}

#[test]
fn int8_matches_the_cpu() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    let shapes: [&[usize]; 5] = [&[1408, 2048], &[7, 13], &[3, 5, 7], &[33], &[2, 1]];
    for shape in shapes {
        let mut w = randn(shape, 0.1, 0.0)?;
        if shape[0] > 2 {
            // a zero row and a NaN
            let n = w.elem_count();
            let cols = *shape.last().unwrap_or(&1);
            let mut v = w.flatten_all()?.to_vec1::<f32>()?;
            v[..cols].fill(0.0);
            v[n - 1] = f32::NAN;
            w = Tensor::from_vec(v, shape, &Device::Cpu)?;
        }
        for dt in FLOATS {
            let w = w.to_dtype(dt)?;
            let a = Int8Tensor::quantize(&w)?;
            let b = Int8Tensor::quantize(&w.to_device(&dev)?)?;
            assert!(b.device().same_device(&dev));
            assert_eq!(a.codes()?, b.codes()?, "{shape:?} {dt:?}: codes");
            assert_eq!(
                f32_bits(a.row_absmax())?,
                f32_bits(b.row_absmax())?,
                "{shape:?} {dt:?}: row absmax"
            );
            let on_gpu = a.to_device(&dev)?;
            for out in FLOATS {
                assert_bits_eq(
                    &raw_bits(&a.dequantize(out)?)?,
                    &raw_bits(&on_gpu.dequantize(out)?)?,
                    &format!("{shape:?} {dt:?}: int8 dequantized {out:?}"),
                );
            }
        }
    }
    Ok(())
}

#[test]
fn dequantizing_many_in_one_launch_equals_one_at_a_time() -> Result<()> {
    let Some(dev) = gpu() else { return Ok(()) };
    // Expert-sized shapes (one launch) and odd ones (partial blocks and nested blocks; sizes
    // whose slices would not start 16-byte aligned take the one-at-a-time path), double-
    // quantized and not, NF4 and FP4: the stacked result equals each tensor's own
    // dequantization on the GPU and on the CPU, bit for bit.
    let configs = [
        FourBitConfig::default(),
        FourBitConfig::nf4_no_double_quant(),
        FourBitConfig::fp4(),
    ];
    for shape in [
        &[1408usize, 2048][..],
        &[2048, 1408],
        &[40, 72],
        &[163, 129],
        &[7],
    ] {
        for cfg in &configs {
            let ts: Vec<FourBitTensor> = (0..5)
                .map(|k| {
                    let w = randn(shape, 0.02, -1.0 + k as f64 * 0.3)?;
                    Ok(FourBitTensor::quantize(&w, cfg)?.to_device(&dev)?)
                })
                .collect::<Result<_>>()?;
            let refs: Vec<&FourBitTensor> = ts.iter().collect();
            for dt in FLOATS {
                let many = FourBitTensor::dequantize_many(&refs, dt)?;
                assert_eq!(many.dims()[0], 5);
                for (k, t) in ts.iter().enumerate() {
                    let what = format!("{shape:?} {cfg:?} {dt:?} tensor {k}");
                    let one = t.dequantize(dt)?;
                    let cpu = t.to_device(&Device::Cpu)?.dequantize(dt)?;
                    let got = raw_bits(&many.get(k)?)?;
                    assert_bits_eq(&got, &raw_bits(&one)?, &what);
                    assert_bits_eq(&got, &raw_bits(&cpu)?, &what);
                }
            }
        }
    }
    Ok(())
}
