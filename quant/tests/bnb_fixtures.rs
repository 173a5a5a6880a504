//! Bit-level agreement with real bitsandbytes output (fixtures/nf4, see fixtures/README.md):
//! `nf4_reference.safetensors` (bitsandbytes 0.49.2 on CPU), `nf4_cuda_bnb050.safetensors`
//! (bitsandbytes 0.50.2 on an H200) and the tiny DeepSeekMoE checkpoint in bnb 4-bit layout.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use moe_peft_quant::{
    dynamic_map, load_bnb_safetensors, FourBitAbsmax, FourBitConfig, FourBitTensor, QuantType,
};

const NF4_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/nf4");
const MATRICES: [&str; 4] = ["w64x64", "w128x96", "w100x36", "w160x130"];

type Map = HashMap<String, Tensor>;

fn load(name: &str) -> Map {
    let path = format!("{NF4_DIR}/{name}");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {path}: {e}"))
}

fn t<'a>(m: &'a Map, k: &str) -> &'a Tensor {
    m.get(k)
        .unwrap_or_else(|| panic!("fixture key {k} missing"))
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn ulps(a: f32, b: f32) -> u32 {
    if a == b {
        return 0;
    }
    assert_eq!(a.is_sign_negative(), b.is_sign_negative(), "{a} vs {b}");
    a.to_bits().abs_diff(b.to_bits())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn bit_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn dq_state(q: &FourBitTensor) -> &moe_peft_quant::DoubleQuantState {
    match q.absmax() {
        FourBitAbsmax::Double(s) => s,
        FourBitAbsmax::Fp32(_) => panic!("expected a double-quantized tensor"),
    }
}

fn json_offset(m: &Map, k: &str) -> f32 {
    let blob = u8s(t(m, &format!("{k}.weight.quant_state.bitsandbytes__nf4")));
    let v: serde_json::Value = serde_json::from_slice(&blob).unwrap();
    v["nested_offset"].as_f64().unwrap() as f32
}

/// First-level fp32 absmax (no double quant).
fn nd_absmax(original: &Tensor) -> Tensor {
    FourBitTensor::quantize(original, &FourBitConfig::nf4_no_double_quant())
        .unwrap()
        .absmax_f32()
        .unwrap()
}

/// The nested absmax follows the offset: ours differs from the reference by at most the offset
/// difference (≤ 1 ulp of the offset) plus 1 ulp of its own rounding, and recomputing the
/// second level with the reference's offset gives its nested absmax and codes bit for bit.
fn check_nested(
    k: &str,
    absmax: &[f32],
    s: &moe_peft_quant::DoubleQuantState,
    ref_offset: f32,
    ref_nested: &[f32],
    ref_codes: &[u8],
) {
    let ours = f32s(&s.nested_absmax);
    assert_eq!(ours.len(), ref_nested.len());
    let d_off = (s.offset - ref_offset).abs();
    for (a, b) in ours.iter().zip(ref_nested) {
        let one_ulp = f32::from_bits(b.to_bits() + 1) - b;
        assert!(
            (a - b).abs() <= d_off + one_ulp,
            "{k}: nested absmax {a} vs {b}"
        );
    }
    let centered: Vec<f32> = absmax.iter().map(|a| a - ref_offset).collect();
    let (codes, nested) =
        moe_peft_quant::dynamic::quantize_blockwise_8bit(&centered, dynamic_map(), 256).unwrap();
    assert!(
        bit_equal(&nested, ref_nested),
        "{k}: nested absmax with the reference offset"
    );
    assert_eq!(codes, ref_codes, "{k}: codes with the reference offset");
}

/// Our quantizer against bitsandbytes 0.49.2 (CPU): packed bytes, codes, absmax and absmax
/// codes exactly; offset within 1 ulp (nested absmax: see `check_nested`); no-DQ bytes, absmax and dequantized
/// values exactly.
#[test]
fn quantize_matches_bnb_cpu_reference() {
    let m = load("nf4_reference.safetensors");
    for k in MATRICES {
        let original = t(&m, &format!("{k}.original"));
        let q = FourBitTensor::quantize(original, &FourBitConfig::default()).unwrap();
        assert_eq!(q.dims(), original.dims());
        assert_eq!(
            u8s(q.packed()),
            u8s(t(&m, &format!("{k}.weight"))),
            "{k}: packed"
        );
        assert_eq!(
            q.codes().unwrap(),
            u8s(t(&m, &format!("{k}.codes"))),
            "{k}: codes"
        );
        let s = dq_state(&q);
        assert_eq!(
            u8s(&s.codes),
            u8s(t(&m, &format!("{k}.weight.absmax"))),
            "{k}: absmax codes"
        );
        assert_eq!(
            u8s(&s.codes),
            u8s(t(&m, &format!("{k}.canonical_map.weight.absmax"))),
            "{k}: absmax codes (canonical map)"
        );
        let ref_offset = json_offset(&m, k);
        let off_ulps = ulps(s.offset, ref_offset);
        assert!(off_ulps <= 1, "{k}: offset {off_ulps} ulp");
        check_nested(
            k,
            &f32s(&nd_absmax(original)),
            s,
            ref_offset,
            &f32s(t(&m, &format!("{k}.weight.nested_absmax"))),
            &u8s(t(&m, &format!("{k}.weight.absmax"))),
        );
        // the map we quantize with is the canonical one (CPU bnb overwrote entry 0 with -1.0)
        let stored_map = f32s(t(&m, &format!("{k}.weight.nested_quant_map")));
        assert_eq!(stored_map[0], -1.0);
        assert!(
            bit_equal(&f32s(&s.map)[1..], &stored_map[1..]),
            "{k}: map entries 1.."
        );
        // dequantized with our own state vs numpy's canonical-map values (offset may differ 1 ulp)
        let ours = f32s(&q.dequantize(DType::F32).unwrap());
        let canon = f32s(t(&m, &format!("{k}.canonical_map.dequantized")));
        let d = max_abs_diff(&ours, &canon);
        println!("{k}: our DQ quantize+dequantize vs canonical_map.dequantized max |diff| {d:e}, offset {off_ulps} ulp");
        assert!(d <= 1e-6, "{k}: {d}");
        if off_ulps == 0 {
            assert!(
                bit_equal(&ours, &canon),
                "{k}: equal offsets must give equal values"
            );
        }

        // first level without double quant
        let nd = FourBitTensor::quantize(original, &FourBitConfig::nf4_no_double_quant()).unwrap();
        assert_eq!(
            u8s(nd.packed()),
            u8s(t(&m, &format!("{k}.noDQ.weight"))),
            "{k}: noDQ packed"
        );
        let absmax = f32s(&nd.absmax_f32().unwrap());
        assert!(
            bit_equal(&absmax, &f32s(t(&m, &format!("{k}.absmax_fp32")))),
            "{k}: absmax_fp32"
        );
        assert!(
            bit_equal(&absmax, &f32s(t(&m, &format!("{k}.noDQ.weight.absmax")))),
            "{k}: noDQ absmax"
        );
        let dq = f32s(&nd.dequantize(DType::F32).unwrap());
        assert!(
            bit_equal(&dq, &f32s(t(&m, &format!("{k}.noDQ.dequantized")))),
            "{k}: noDQ dequantized"
        );
    }
}

/// Dequantizing the fixture's own stored state (its map, incl. CPU's -1.0, and offset) gives
/// bitsandbytes' dequantized values bit for bit; writing it back reproduces every tensor and
/// the JSON blob byte for byte.
#[test]
fn load_bnb_cpu_state_is_bit_exact() {
    let m = load("nf4_reference.safetensors");
    let file = format!("{NF4_DIR}/nf4_reference.safetensors");
    for k in MATRICES {
        for (prefix, deq_key, absmax_key) in [
            (
                k.to_string(),
                format!("{k}.dequantized"),
                Some(format!("{k}.absmax_dequantized")),
            ),
            (format!("{k}.noDQ"), format!("{k}.noDQ.dequantized"), None),
        ] {
            let q =
                FourBitTensor::from_bnb_tensors(&prefix, &|key| m.get(key).cloned(), Some(&file))
                    .unwrap();
            assert_eq!(q.quant_type(), QuantType::Nf4);
            assert_eq!(q.dtype(), DType::F32);
            let deq = q.dequantize(DType::F32).unwrap();
            assert_eq!(deq.dims(), t(&m, &deq_key).dims());
            let (a, b) = (f32s(&deq), f32s(t(&m, &deq_key)));
            assert!(
                bit_equal(&a, &b),
                "{prefix}: max diff {:e}",
                max_abs_diff(&a, &b)
            );
            if let Some(ak) = absmax_key {
                assert!(
                    bit_equal(&f32s(&q.absmax_f32().unwrap()), &f32s(t(&m, &ak))),
                    "{ak}"
                );
            }
            for (key, tensor) in q.to_bnb_tensors(&prefix).unwrap() {
                let reference = t(&m, &key);
                assert_eq!(tensor.dtype(), reference.dtype(), "{key}");
                assert_eq!(tensor.dims(), reference.dims(), "{key}");
                match tensor.dtype() {
                    DType::U8 => assert_eq!(u8s(&tensor), u8s(reference), "{key}"),
                    _ => assert!(bit_equal(&f32s(&tensor), &f32s(reference)), "{key}"),
                }
            }
        }
    }
}

/// Our quantizer (canonical map) against CUDA bitsandbytes 0.50.2: identical packed bytes,
/// absmax codes, map, no-DQ absmax and no-DQ values; offset within 1 ulp (nested absmax: see
/// `check_nested`);
/// DQ dequantized values bit-equal when the offsets agree (w128x96, w100x36) and within 1e-6
/// otherwise. Loading the CUDA file's own state reproduces its dequantized values bit for bit.
#[test]
fn quantize_matches_bnb_cuda() {
    let m = load("nf4_cuda_bnb050.safetensors");
    let reference = load("nf4_reference.safetensors");
    let file = format!("{NF4_DIR}/nf4_cuda_bnb050.safetensors");
    for k in MATRICES {
        let original = t(&reference, &format!("{k}.original"));
        let q = FourBitTensor::quantize(original, &FourBitConfig::default()).unwrap();
        assert_eq!(
            u8s(q.packed()),
            u8s(t(&m, &format!("{k}.weight"))),
            "{k}: packed"
        );
        let s = dq_state(&q);
        assert_eq!(
            u8s(&s.codes),
            u8s(t(&m, &format!("{k}.weight.absmax"))),
            "{k}: absmax codes"
        );
        assert!(
            bit_equal(
                &f32s(&s.map),
                &f32s(t(&m, &format!("{k}.weight.nested_quant_map")))
            ),
            "{k}: dynamic map"
        );
        assert!(bit_equal(
            &dynamic_map()[..],
            &f32s(t(&m, &format!("{k}.weight.nested_quant_map")))
        ));
        assert!(
            bit_equal(q.code(), &f32s(t(&m, &format!("{k}.weight.quant_map")))),
            "{k}: quant_map"
        );
        let cuda_offset = f32s(t(&m, &format!("{k}.offset")))[0];
        let off_ulps = ulps(s.offset, cuda_offset);
        assert!(off_ulps <= 1, "{k}: offset {} vs {cuda_offset}", s.offset);
        check_nested(
            k,
            &f32s(&nd_absmax(original)),
            s,
            cuda_offset,
            &f32s(t(&m, &format!("{k}.weight.nested_absmax"))),
            &u8s(t(&m, &format!("{k}.weight.absmax"))),
        );
        let ours = f32s(&q.dequantize(DType::F32).unwrap());
        let cuda = f32s(t(&m, &format!("{k}.dequantized")));
        let d = max_abs_diff(&ours, &cuda);
        println!("{k}: our DQ values vs CUDA bnb max |diff| {d:e} (offset {off_ulps} ulp apart)");
        assert!(d <= 1e-6, "{k}: {d}");
        if off_ulps == 0 {
            assert!(
                bit_equal(&ours, &cuda),
                "{k}: equal offsets must give equal values"
            );
        }
        let nd = FourBitTensor::quantize(original, &FourBitConfig::nf4_no_double_quant()).unwrap();
        assert_eq!(
            u8s(nd.packed()),
            u8s(t(&m, &format!("{k}.noDQ.weight"))),
            "{k}: noDQ packed"
        );
        assert!(bit_equal(
            &f32s(&nd.absmax_f32().unwrap()),
            &f32s(t(&m, &format!("{k}.noDQ.weight.absmax")))
        ));
        assert!(bit_equal(
            &f32s(&nd.dequantize(DType::F32).unwrap()),
            &f32s(t(&m, &format!("{k}.noDQ.dequantized")))
        ));
        // the CUDA file's own state
        let loaded =
            FourBitTensor::from_bnb_tensors(k, &|key| m.get(key).cloned(), Some(&file)).unwrap();
        assert!(
            bit_equal(&f32s(&loaded.dequantize(DType::F32).unwrap()), &cuda),
            "{k}: load CUDA state"
        );
        assert!(bit_equal(
            &f32s(&loaded.absmax_f32().unwrap()),
            &f32s(t(&m, &format!("{k}.absmax_dequantized")))
        ));
        // and with our state but the CUDA offset, the values are CUDA's bit for bit
        let blob = loaded.bnb_quant_state_json().unwrap();
        let cuda_blob = u8s(t(&m, &format!("{k}.weight.quant_state.bitsandbytes__nf4")));
        assert_eq!(blob.as_bytes(), &cuda_blob[..], "{k}: JSON blob");
    }
}

/// The tiny DeepSeekMoE in bnb 4-bit layout: 69 quantized `*_proj` linears whose dequantized
/// weights equal `dequantized_model.safetensors` (observed max |diff| printed; bound 1e-6);
/// every other tensor is carried through unchanged.
#[test]
fn tiny_model_checkpoint_dequantizes_to_reference() {
    let ckpt = load_bnb_safetensors(
        format!("{NF4_DIR}/tiny_deepseek_moe_nf4/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let reference = load("dequantized_model.safetensors");
    assert_eq!(ckpt.quantized.len(), 69);
    let mut worst = 0f32;
    for (prefix, q) in &ckpt.quantized {
        assert!(prefix.ends_with("_proj"), "{prefix}");
        assert!(q.is_double_quant());
        assert_eq!(q.block_size(), 64);
        let key = format!("{prefix}.weight");
        let r = t(&reference, &key);
        assert_eq!(q.dims(), r.dims(), "{key}");
        let d = max_abs_diff(&f32s(&q.dequantize(DType::F32).unwrap()), &f32s(r));
        worst = worst.max(d);
    }
    println!("tiny model: max |dequantized - reference| over 69 linears = {worst:e}");
    assert!(worst <= 1e-6, "{worst}");
    assert_eq!(ckpt.dense.len() + ckpt.quantized.len(), reference.len());
    for (k, v) in &ckpt.dense {
        assert!(bit_equal(&f32s(v), &f32s(t(&reference, k))), "{k}");
    }
}
