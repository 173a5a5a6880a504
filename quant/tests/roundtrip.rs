//! Save/load round trips through the bitsandbytes safetensors layout, FP4 sanity, bits per
//! parameter.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use moe_peft_quant::{
    load_bnb_safetensors, save_bnb_safetensors, FourBitAbsmax, FourBitConfig, FourBitTensor,
    QuantType, FP4_CODE,
};

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn assert_same_tensor(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtype");
    assert_eq!(a.dims(), b.dims(), "{what}: dims");
    match a.dtype() {
        DType::U8 => assert_eq!(u8s(a), u8s(b), "{what}"),
        _ => assert_eq!(bits(a), bits(b), "{what}"),
    }
}

fn assert_same_quantized(a: &FourBitTensor, b: &FourBitTensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}");
    assert_eq!(a.dtype(), b.dtype(), "{what}");
    assert_eq!(a.block_size(), b.block_size(), "{what}");
    assert_eq!(a.quant_type(), b.quant_type(), "{what}");
    assert_eq!(a.code(), b.code(), "{what}");
    assert_same_tensor(a.packed(), b.packed(), what);
    match (a.absmax(), b.absmax()) {
        (FourBitAbsmax::Fp32(x), FourBitAbsmax::Fp32(y)) => assert_same_tensor(x, y, what),
        (FourBitAbsmax::Double(x), FourBitAbsmax::Double(y)) => {
            assert_same_tensor(&x.codes, &y.codes, what);
            assert_same_tensor(&x.map, &y.map, what);
            assert_same_tensor(&x.nested_absmax, &y.nested_absmax, what);
            assert_eq!(x.offset.to_bits(), y.offset.to_bits(), "{what}: offset");
            assert_eq!(x.block_size, y.block_size, "{what}");
        }
        _ => panic!("{what}: absmax kinds differ"),
    }
    for dt in [DType::F32, DType::BF16] {
        assert_same_tensor(
            &a.dequantize(dt).unwrap(),
            &b.dequantize(dt).unwrap(),
            &format!("{what}: dequantized {dt:?}"),
        );
    }
}

/// quantize → to_bnb_tensors → safetensors file → load → from_bnb_tensors gives identical parts
/// and identical dequantized values, for NF4+DQ (bf16, odd element count, partial block and
/// 2 nested blocks), NF4 without DQ, FP4, and block sizes 32 and 4096; plain tensors come back.
#[test]
fn save_load_round_trip() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let cases: Vec<(&str, Tensor, FourBitConfig)> = vec![
        (
            "model.layers.0.mlp.down_proj",
            Tensor::randn(0f32, 0.05, (163, 129), &dev)?.to_dtype(DType::BF16)?,
            FourBitConfig::default(),
        ),
        (
            "model.layers.0.self_attn.q_proj",
            Tensor::randn(0f32, 1., (64, 48), &dev)?,
            FourBitConfig::nf4_no_double_quant(),
        ),
        (
            "model.layers.1.mlp.experts.3.up_proj",
            Tensor::randn(0f32, 1., (32, 65), &dev)?.to_dtype(DType::F16)?,
            FourBitConfig::fp4(),
        ),
        (
            "small_blocks",
            Tensor::randn(0f32, 1., (7, 9), &dev)?,
            FourBitConfig {
                block_size: 32,
                ..FourBitConfig::default()
            },
        ),
        (
            "big_blocks",
            Tensor::randn(0f32, 1., (100, 90), &dev)?,
            FourBitConfig {
                block_size: 4096,
                quant_type: QuantType::Fp4,
                double_quant: false,
                ..FourBitConfig::default()
            },
        ),
    ];
    let mut quantized = BTreeMap::new();
    for (name, w, cfg) in &cases {
        quantized.insert(name.to_string(), FourBitTensor::quantize(w, cfg)?);
    }
    let mut dense = BTreeMap::new();
    dense.insert(
        "model.norm.weight".to_string(),
        Tensor::randn(0f32, 1., 64, &dev)?,
    );
    dense.insert(
        "lm_head.weight".to_string(),
        Tensor::randn(0f32, 1., (16, 64), &dev)?.to_dtype(DType::BF16)?,
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.safetensors");
    save_bnb_safetensors(&path, &quantized, &dense)?;

    // the raw file has bitsandbytes' keys, dtypes and shapes
    let raw = candle_core::safetensors::load(&path, &dev)?;
    let p = "model.layers.0.mlp.down_proj.weight";
    let n: usize = 163 * 129;
    assert_eq!(raw[p].dtype(), DType::U8);
    assert_eq!(raw[p].dims(), &[n.div_ceil(2), 1]);
    assert_eq!(raw[&format!("{p}.absmax")].dtype(), DType::U8);
    assert_eq!(raw[&format!("{p}.absmax")].dims(), &[n.div_ceil(64)]);
    assert_eq!(raw[&format!("{p}.nested_absmax")].dims(), &[2]);
    assert_eq!(raw[&format!("{p}.nested_quant_map")].dims(), &[256]);
    assert_eq!(raw[&format!("{p}.quant_map")].dims(), &[16]);
    let blob = u8s(&raw[&format!("{p}.quant_state.bitsandbytes__nf4")]);
    let json = String::from_utf8(blob)?;
    assert!(json.starts_with(
        r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [163, 129], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": "#
    ), "{json}");
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(raw[&format!("{q}.absmax")].dtype(), DType::F32);
    assert!(!raw.contains_key(&format!("{q}.nested_absmax")));
    assert!(raw
        .contains_key("model.layers.1.mlp.experts.3.up_proj.weight.quant_state.bitsandbytes__fp4"));
    assert_eq!(raw.len(), 6 + 4 + 6 + 6 + 4 + 2);
    let header_len = u64::from_le_bytes(std::fs::read(&path)?[..8].try_into()?) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path)?[8..8 + header_len])?;
    assert_eq!(header["__metadata__"]["format"], "pt");

    // per-module loading through a getter, and the whole-file loader
    for (name, _, _) in &cases {
        let back = FourBitTensor::from_bnb_tensors(name, &|k| raw.get(k).cloned(), None)?;
        assert_same_quantized(&quantized[*name], &back, name);
    }
    let ckpt = load_bnb_safetensors(&path, &dev)?;
    assert_eq!(ckpt.quantized.len(), cases.len());
    for (name, q) in &ckpt.quantized {
        assert_same_quantized(&quantized[name], q, name);
    }
    assert_eq!(ckpt.dense.len(), 2);
    for (k, v) in &dense {
        assert_same_tensor(v, &ckpt.dense[k], k);
    }
    Ok(())
}

/// Writing the same key twice is refused.
#[test]
fn save_refuses_duplicate_keys() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1., (8, 8), &dev)?;
    let quantized = BTreeMap::from([(
        "p".to_string(),
        FourBitTensor::quantize(&w, &FourBitConfig::default())?,
    )]);
    let dense = BTreeMap::from([("p.weight".to_string(), w)]);
    let dir = tempfile::tempdir()?;
    let err = save_bnb_safetensors(dir.path().join("x.safetensors"), &quantized, &dense)
        .expect_err("duplicate key");
    assert!(err.to_string().contains("p.weight"), "{err}");
    Ok(())
}

/// FP4: every value decodes to `FP4_CODE[c] * absmax`, the error is at most half the widest gap
/// (between 2/3 and 1) times the block absmax, and re-quantizing the dequantized tensor
/// reproduces absmax, codes (FP4: up to -0 → +0) and values exactly (also for NF4).
#[test]
fn fp4_and_nf4_requantize_idempotent() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1., (96, 130), &dev)?;
    // fp32 absmax (no double quant), so that the bound is exact and re-quantizing is idempotent
    let fp4 = FourBitConfig {
        double_quant: false,
        ..FourBitConfig::fp4()
    };
    for cfg in [fp4, FourBitConfig::nf4_no_double_quant()] {
        let q = FourBitTensor::quantize(&w, &cfg)?;
        let d = q.dequantize(DType::F32)?;
        let dv = d.flatten_all()?.to_vec1::<f32>()?;
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let am = q.absmax_f32()?.to_vec1::<f32>()?;
        let codes = q.codes()?;
        let half_gap = match cfg.quant_type {
            QuantType::Fp4 => (1.0 - 2.0 / 3.0) / 2.0,
            QuantType::Nf4 => (1.0 - 0.696_192_8) / 2.0,
        };
        let mut worst = 0f32;
        for j in 0..wv.len() {
            let a = am[j / 64];
            assert_eq!(dv[j], q.code()[codes[j] as usize] * a);
            let e = (dv[j] - wv[j]).abs() / a;
            assert!(
                e <= half_gap + 1e-6,
                "{:?} j={j}: {e} w={} scaled={} code={} a={a}",
                cfg.quant_type,
                wv[j],
                wv[j] / a,
                codes[j]
            );
            worst = worst.max(e);
        }
        println!("{:?}: max |w - deq| / absmax = {worst}", cfg.quant_type);
        if cfg.quant_type == QuantType::Fp4 {
            assert_eq!(q.code(), &FP4_CODE);
            // FP4 encodes -0.0 as 0b1000: negative tiny values keep their sign bit
            assert!(codes.iter().any(|&c| c >= 8) && codes.iter().any(|&c| c < 8));
        }
        let q2 = FourBitTensor::quantize(&d, &cfg)?;
        assert_eq!(am, q2.absmax_f32()?.to_vec1::<f32>()?);
        let codes2 = q2.codes()?;
        match cfg.quant_type {
            QuantType::Nf4 => assert!(codes == codes2, "NF4 re-quantization changed codes"),
            // FP4's -0 (0b1000) dequantizes to -0.0, which re-quantizes to +0 (bnb: sign = x < 0)
            QuantType::Fp4 => {
                let plus_zero = |c: &u8| if *c == 8 { 0 } else { *c };
                let a: Vec<u8> = codes.iter().map(plus_zero).collect();
                assert!(a == codes2, "FP4 re-quantization changed codes");
                assert!(codes2.iter().all(|&c| c != 8));
            }
        }
        let d2 = q2.dequantize(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(d2 == dv, "{:?}: dequantized values changed", cfg.quant_type);
    }
    Ok(())
}

/// 4 + 8/64 + 32/(64·256) = 4.126953125 ≈ 4.127 bits with double quantization; 4.5 without.
#[test]
fn bits_per_param_values() -> anyhow::Result<()> {
    let w = Tensor::randn(0f32, 1., (1408, 256), &Device::Cpu)?;
    let q = FourBitTensor::quantize(&w, &FourBitConfig::default())?;
    assert_eq!(q.bits_per_param(), 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0));
    assert!((q.bits_per_param() - 4.127).abs() < 5e-4);
    let q = FourBitTensor::quantize(&w, &FourBitConfig::nf4_no_double_quant())?;
    assert_eq!(q.bits_per_param(), 4.5);
    // exact storage of this tensor: the formula plus the 64-byte code book
    let exact = 8.0 * q.storage_bytes() as f64 / q.numel() as f64;
    assert!(
        (exact - (4.5 + 512.0 / q.numel() as f64)).abs() < 1e-12,
        "{exact}"
    );
    Ok(())
}

/// FP4 (and NF4) with double quantization, the accuracy round trip: each block's absmax comes
/// back through its 8-bit code as `map[code] · nested_absmax + offset`, where the code is the
/// nearest map entry to `(absmax - offset) / nested_absmax`; every value decodes to
/// `code[c] · absmax_dq`, and its error is at most half the widest 4-bit gap times the true
/// absmax plus the absmax's own double-quantization error.
#[test]
fn four_bit_with_double_quant_accuracy() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    // 600 blocks of 64: three nested blocks of 256 (the last one partial), rows of mixed scale.
    let rows: Vec<Tensor> = (0..120)
        .map(|r| Tensor::randn(0f32, 0.05 + 0.02 * (r % 7) as f32, (1, 320), &dev))
        .collect::<candle_core::Result<_>>()?;
    let w = Tensor::cat(&rows, 0)?;
    let wv = w.flatten_all()?.to_vec1::<f32>()?;
    for cfg in [FourBitConfig::fp4(), FourBitConfig::default()] {
        assert!(cfg.double_quant);
        let q = FourBitTensor::quantize(&w, &cfg)?;
        let FourBitAbsmax::Double(s) = q.absmax() else {
            panic!("{:?}: not double-quantized", cfg.quant_type)
        };
        let map = s.map.to_vec1::<f32>()?;
        let dq_codes = s.codes.to_vec1::<u8>()?;
        let nested = s.nested_absmax.to_vec1::<f32>()?;
        let am = q.absmax_f32()?.to_vec1::<f32>()?;
        let true_am: Vec<f32> = wv
            .chunks(64)
            .map(|b| b.iter().fold(0f32, |m, x| m.max(x.abs())))
            .collect();
        assert_eq!(am.len(), true_am.len());
        let mut worst_am = 0f32;
        for (b, (&a_dq, &a)) in am.iter().zip(&true_am).enumerate() {
            let n = nested[b / s.block_size];
            let x = (a - s.offset) / n;
            let c = dq_codes[b] as usize;
            let nearest = map
                .iter()
                .map(|m| (x - m).abs())
                .fold(f32::INFINITY, f32::min);
            assert!(
                (x - map[c]).abs() <= nearest + 1e-6,
                "{:?} block {b}: code {c} ({}) is not the nearest to {x}",
                cfg.quant_type,
                map[c]
            );
            assert!((a_dq - (map[c] * n + s.offset)).abs() <= 1e-6 * a.abs().max(1.0));
            worst_am = worst_am.max((a_dq - a).abs() / a);
        }
        let half_gap = match cfg.quant_type {
            QuantType::Fp4 => (1.0 - 2.0 / 3.0) / 2.0,
            QuantType::Nf4 => (1.0 - 0.696_192_8) / 2.0,
        };
        let d = q.dequantize(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let codes = q.codes()?;
        let mut worst = 0f32;
        for j in 0..wv.len() {
            let (a_dq, a) = (am[j / 64], true_am[j / 64]);
            assert_eq!(d[j], q.code()[codes[j] as usize] * a_dq);
            let bound = half_gap * a + (a_dq - a).abs() + 1e-6 * a;
            let e = (d[j] - wv[j]).abs();
            assert!(
                e <= bound,
                "{:?} j={j}: error {e} above {bound}",
                cfg.quant_type
            );
            worst = worst.max(e / a);
        }
        println!(
            "{:?} + double quant: max |w - deq| / absmax = {worst}, max absmax error {worst_am}",
            cfg.quant_type
        );
    }
    Ok(())
}
